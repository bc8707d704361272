"""What the GGUF plugin adds to reports: a run's report.md (the GGUF's agreement with the HF model,
the table of quantisation types), the comparison report (section "GGUF exports") and the terminal.

These read the plugin's own layout of run.json: ``eval.gguf`` / ``eval.gguf_unquantized`` (the smoke
tests' ``SmokeResult.as_record``) and ``exports.gguf`` (the exporter's files, sizes and ``info``:
``quant_type``, ``quantizations`` when it wrote several types).
"""

from __future__ import annotations

from rich.table import Table

from peftbench.kit import console, human_bytes, markdown_table
from peftbench_plugins.gguf.smoke import smoke_summary

# --- a run's report.md ---------------------------------------------------------------------------


def run_report_lines(record: dict) -> list[str]:
    """The run report's GGUF lines, below the table of exports."""
    return agreement_lines(record) + quantization_lines(record)


def agreement_lines(record: dict) -> list[str]:
    """How each smoke-tested GGUF's answers compare with the fine-tuned model's (one sentence each)."""
    if not record.get("exports"):
        return []
    lines = []
    for key in ("gguf_unquantized", "gguf"):
        gguf = record.get("eval", {}).get(key)
        if gguf and gguf.get("agreement_with_hf"):
            lines.append(f"\nGGUF {gguf.get('quant_type', '')} vs fine-tuned HF model on the same {gguf['n']} examples: "
                         f"ROUGE-1 {gguf['rouge1']:.2f} vs {gguf['hf_rouge1_same_examples']:.2f}, agreement (ROUGE-1 of "
                         f"GGUF answers against HF answers) {gguf['agreement_with_hf']['rouge1']:.2f}; "
                         f"{gguf['ended_at_eot']} of {gguf['n']} answers ended at end-of-turn.")
    return lines


QUANT_COLUMNS = ("type", "size", "ROUGE-1", "HF ROUGE-1", "change", "agreement", "tokens/s", "smoke")


def gguf_quantizations(record: dict) -> list[dict]:
    """Each GGUF type the gguf exporter wrote, as ``{quant_type, size, smoke}`` with ``smoke`` the
    exporter's summary of its smoke test (None where it did not run). The exporter lists them under
    ``exports.gguf.quantizations`` when it wrote several types; a single type is read from
    ``eval.gguf`` and the export's file size, so records of either kind give the same rows."""
    gguf_export = (record.get("exports") or {}).get("gguf") or {}
    if gguf_export.get("quantizations"):
        return gguf_export["quantizations"]
    scores = (record.get("eval") or {}).get("gguf")
    if not gguf_export and not scores:
        return []
    quant_type = (scores or {}).get("quant_type") or gguf_export.get("quant_type")
    return [{"quant_type": quant_type, "size": (gguf_export.get("sizes") or {}).get("gguf"), "smoke": smoke_summary(scores)}]


def quantization_row(q: dict) -> list[str]:
    """One GGUF type (an entry of ``gguf_quantizations``) as the QUANT_COLUMNS cells: file size, the smoke
    test's ROUGE-1 against the references, the HF model's on the same examples, the difference,
    agreement (ROUGE-1 of the GGUF's answers against the HF model's) and llama.cpp's generated tokens/s."""
    smoke = q.get("smoke") or {}
    return [str(q.get("quant_type") or "?"), human_bytes(q.get("size")), _num(smoke.get("rouge1")),
            _num(smoke.get("hf_rouge1")), _change(smoke),
            _num(smoke.get("agreement_rouge1")), _num(smoke.get("tokens_per_second"), ".1f"),
            "not run" if not smoke else "passed" if smoke.get("passed") else "failed"]


def quantization_rows(record: dict) -> list[list[str]]:
    return [quantization_row(q) for q in gguf_quantizations(record)]


def _change(smoke: dict) -> str:
    """The GGUF's ROUGE-1 change against the HF model, ± its paired standard error where recorded
    (older smoke tests did not record it)."""
    se = smoke.get("delta_rouge1_se")
    return _num(smoke.get("delta_rouge1"), "+.2f") + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "")


def _num(x, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def smoke_examples(quantizations: list[dict]) -> int | None:
    """How many examples the smoke tests of these GGUF types (``gguf_quantizations``) answered; None if none ran."""
    return next((q["smoke"]["n"] for q in quantizations if q.get("smoke")), None)


def quantization_lines(record: dict) -> list[str]:
    quantizations = gguf_quantizations(record)
    if len(quantizations) < 2:  # one type: agreement_lines' sentence says it all
        return []
    n = smoke_examples(quantizations)
    return ["", f"Quantisation types compared (llama.cpp smoke test on {n or 'no'} examples; pick the smallest file "
                "that keeps the quality):", "", *markdown_table(QUANT_COLUMNS, [quantization_row(q) for q in quantizations])]


def print_quantization_table(record: dict) -> None:
    rows = quantization_rows(record)
    if len(rows) < 2:
        return
    table = Table(title="GGUF quantisation types (smoke test against the fine-tuned HF model)")
    for col in QUANT_COLUMNS:
        table.add_column(col, justify="left" if col in ("type", "smoke") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


# --- the comparison report -----------------------------------------------------------------------

COMPARISON_INTRO = [
    "## GGUF exports", "",
    "Each exported run's GGUF files, smoke-tested with llama.cpp against that run's own HF model on the same",
    "examples: ROUGE-1 of both, the change, and agreement (ROUGE-1 of the GGUF's answers against the HF",
    "model's). The smoke test fails a file more than `gguf.margin` (default 1.5) ROUGE-1 below its HF model.",
    "",
]


def comparison_lines(records: list[dict]) -> list[str]:
    """Section "GGUF exports": one row per run and GGUF type, the columns of a run's own quantisation
    table; nothing when no run has a GGUF."""
    rows = []
    for record in records:
        after = (record["run_info"].get("exports_after_run") or [{}])[-1]
        method = (record["run_info"].get("recipe") or {}).get("method") or {}
        merge_into = after.get("merge_into") or method.get("merge_into")
        if method.get("load_in_4bit") is False:  # a 16-bit base: merge_into did not apply (older exports recorded it)
            merge_into = None
        where = "in the run" if not after else after.get("device", "?") + (f": {after['cpu']}" if after.get("cpu") else "")
        quantizations = gguf_quantizations(record)
        examples = smoke_examples(quantizations)
        name = record["run_info"]["experiment_name"]
        rows += [[name, where, merge_into or "—", str(examples or "—"), *quantization_row(q)] for q in quantizations]
    if not rows:
        return []
    return COMPARISON_INTRO + markdown_table(["run", "exported on", "merged into", "examples", *QUANT_COLUMNS], rows,
                                             text_columns=3) + [""]


# --- the terminal --------------------------------------------------------------------------------


def print_summary(record: dict) -> None:
    """After a run or an export: the first GGUF's agreement with the HF model, and the table of types."""
    gguf = record.get("eval", {}).get("gguf")
    if gguf and gguf.get("hf_rouge1_same_examples") is not None:
        console.print(f"GGUF {gguf.get('quant_type')}: ROUGE-1 {gguf['rouge1']:.2f} vs the HF model's "
                      f"{gguf['hf_rouge1_same_examples']:.2f} on the same {gguf['n']} examples, agreement "
                      f"{gguf['agreement_with_hf']['rouge1']:.2f}, {gguf['ended_at_eot']} of {gguf['n']} ended at end-of-turn")
    print_quantization_table(record)
