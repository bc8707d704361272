"""GGUF, llama.cpp and Ollama as a peftbench plugin.

- exporters ``gguf`` (convert.py, exporter.py) and ``ollama`` (ollama.py: Modelfile and live check);
- the smoke test of a GGUF (smoke.py; answering.py, llama.py: llama.cpp in child processes) and its
  command ``peftbench smoke`` (command.py);
- ``peftbench doctor``'s llama.cpp lines (doctor.py);
- its sections of the run and comparison reports (report.py);
- every workaround for llama-cpp-python and the gguf packages (compat.py).

Written like a third-party plugin: it imports peftbench.api, peftbench.kit and its own modules only.
"""

from __future__ import annotations

from peftbench.api import hookimpl


@hookimpl
def peftbench_register_exporters(register):
    from peftbench_plugins.gguf.exporter import GgufExporter
    from peftbench_plugins.gguf.ollama import OllamaExporter

    register(GgufExporter)
    register(OllamaExporter)


@hookimpl
def peftbench_register_commands(register):
    from peftbench_plugins.gguf.command import SmokeCommand

    register(SmokeCommand)


@hookimpl
def peftbench_doctor_checks():
    from peftbench_plugins.gguf.doctor import check_llama_cpp

    return [check_llama_cpp]


@hookimpl
def peftbench_run_report_sections(record):
    from peftbench_plugins.gguf.report import run_report_lines

    return run_report_lines(record)


@hookimpl
def peftbench_score_label(key, scores):
    """The gguf exporter's rows of the ROUGE table: under the HF ones, labelled with their type."""
    if key in ("gguf", "gguf_unquantized"):
        return f"GGUF {scores.info.get('quant_type', '')} (llama.cpp)".replace("  ", " ")
    return None


@hookimpl
def peftbench_comparison_report_sections(records):
    from peftbench_plugins.gguf.report import comparison_lines

    return comparison_lines(records)


@hookimpl
def peftbench_print_run_summary(record):
    from peftbench_plugins.gguf.report import print_summary

    print_summary(record)
