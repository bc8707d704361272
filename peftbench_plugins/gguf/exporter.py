"""Exporter ``gguf``: the run's merged checkpoint converted with llama.cpp's own converter, then
quantised with llama.cpp (Q4_K_M unless the recipe names another type, or several: each from the one
conversion), then checked: llama.cpp loads it, the chat template and end-of-turn token are inside,
and (option ``smoke``) it still summarises.

What it records under ``exports.gguf`` (its ``info``) is this plugin's own layout; the report
sections of ``report.py`` read it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from peftbench.api import ExporterPlugin, ExportResult, Options
from peftbench.kit import console, merged_checkpoint, merged_model_bytes
from peftbench_plugins.gguf.convert import check_gguf, convert, quantize
from peftbench_plugins.gguf.forgetting import forgetting_in_run
from peftbench_plugins.gguf.smoke import smoke_in_run, smoke_summary

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


class GgufExporter(ExporterPlugin):
    """Merged checkpoint -> GGUF (llama.cpp's converter) -> quantised GGUF (llama.cpp's quantiser)."""

    name = "gguf"
    Options = GgufOptions
    requires = ("mergeable",)  # llama.cpp converts the standard checkpoint a merge leaves
    export_default = True  # `peftbench export RUN` writes a GGUF
    after_run_options = {"smoke": True}  # the point of exporting a finished run: check it against the run's HF answers

    def estimated_bytes(self, options: GgufOptions, ctx) -> int:
        """The merged checkpoint (in the evaluated dtype, unless already written), the converter's
        16-bit GGUF and the quantised one (at most ~1 byte per weight for the types offered here)."""
        per_param = (0 if (ctx.exports_dir / "merged").is_dir() else ctx.policy.compute_dtype.itemsize) + 2 + 1
        return merged_model_bytes(ctx.model, bytes_per_param=per_param)

    def export(self, options: GgufOptions, ctx) -> ExportResult:
        checkpoint, merge_info = merged_checkpoint(ctx)
        times = {"merge_s": merge_info["merge_s"]}  # done here or, reused, by an earlier stage of this run
        unquantized = ctx.exports_dir / "gguf" / f"model-{options.convert_type}.gguf"
        start = time.perf_counter()
        convert(checkpoint, unquantized, options.convert_type)
        times[f"convert_{options.convert_type}_s"] = round(time.perf_counter() - start, 2)
        console.print(f"converted {checkpoint} -> {unquantized} in {times[f'convert_{options.convert_type}_s']} s")

        info: dict = {"quant_type": options.quant_types[0], "merged_from": str(checkpoint), "merge_reused": merge_info["reused"]}
        files, problems, scores, quantizations = self._all_types(options, ctx, unquantized, times, info)
        start = time.perf_counter()
        forgetting = forgetting_in_run(files["gguf"], ctx)  # the run's GGUF (the first type) on the general texts
        if forgetting:
            (scores["gguf"] if "gguf" in scores else info).update(forgetting)
            times["forgetting_s"] = round(time.perf_counter() - start, 2)
        if str(unquantized) not in files.values():
            files[f"gguf_{options.convert_type}"] = str(unquantized)
        if options.smoke_unquantized and str(unquantized) != files["gguf"]:
            start = time.perf_counter()
            unquantized_scores, smoke_problems = smoke_in_run(unquantized, ctx, options.margin, f"gguf {options.convert_type}")
            if unquantized_scores:
                # first in eval, so the report lists the unquantised GGUF above the quantised ones
                scores = {"gguf_unquantized": {**unquantized_scores, "quant_type": options.convert_type.upper()}, **scores}
            times[f"smoke_{options.convert_type}_s"] = round(time.perf_counter() - start, 2)
            problems += smoke_problems
        if not options.keep_unquantized and f"gguf_{options.convert_type}" in files:
            unquantized.unlink()
            del files[f"gguf_{options.convert_type}"]

        sizes = {label: Path(path).stat().st_size for label, path in files.items()}
        for entry in quantizations:
            entry["size"] = Path(entry["file"]).stat().st_size
        return ExportResult(files=files, sizes=sizes, info={**info, "times": times}, problems=problems, scores=scores)

    def _all_types(self, options: GgufOptions, ctx, unquantized: Path, times: dict, info: dict):
        """Every quantisation type asked for, each from the one conversion: (files, problems, scores for
        eval.gguf, the types' entries). Adds to ``info`` what reports read of them."""
        types = options.quant_types
        files: dict[str, str] = {}
        problems: list[str] = []
        scores: dict = {}  # eval.gguf (the first type) in run.json
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
                    scores["gguf"] = entry["smoke"]
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
        return files, problems, scores, quantizations

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
