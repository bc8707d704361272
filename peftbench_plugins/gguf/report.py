"""What the GGUF plugin adds to reports: a run's report.md (the GGUF's agreement with the HF model,
the table of quantisation types), the comparison report (section "GGUF exports") and the terminal.

Each receives the typed run record (``peftbench.api.RunRecord``, the report hooks' contract) and reads
what peftbench owns as typed fields (the run's name, ``run_info.exports_after_run``, the method's
options) and this plugin's own layout through the record's open parts: ``eval["gguf"]`` /
``eval["gguf_unquantized"]`` (the smoke tests' ``SmokeResult.as_record``: ROUGE and ``n`` typed, the rest
in ``.info``) and ``exports["gguf"]`` (the exporter's files and sizes, and in ``.info`` its ``quant_type``
and ``quantizations`` when it wrote several types).
"""

from __future__ import annotations

from rich.table import Table

from peftbench.api import RunRecord
from peftbench.kit import console, human_bytes, markdown_table
from peftbench_plugins.gguf.smoke import smoke_summary

# --- a run's report.md ---------------------------------------------------------------------------


def run_report_lines(record: RunRecord) -> list[str]:
    """The run report's GGUF lines, below the table of exports."""
    return agreement_lines(record) + quantization_lines(record) + forgetting_lines(record)


def gguf_forgetting(record: RunRecord) -> dict:
    """The exporter's forgetting figures for the run's GGUF: in eval.gguf when the smoke test ran, else in
    exports.gguf (``forgetting_loss`` ... or ``forgetting_note``); {} when the probe did not run."""
    scores, export = record.eval.get("gguf"), record.exports.get("gguf")
    for info in (scores.info if scores is not None else {}, export.info if export is not None else {}):
        if "forgetting_loss" in info or "forgetting_note" in info:
            return info
    return {}


def forgetting_lines(record: RunRecord) -> list[str]:
    """The GGUF's loss on the forgetting probe's general texts, beside the HF model's (the run report's
    Forgetting table); nothing for a record without it."""
    figures = gguf_forgetting(record)
    if not figures:
        return []
    quant_type = figures.get("quant_type") or (record.exports["gguf"].info.get("quant_type") if "gguf" in record.exports else "")
    if "forgetting_loss" not in figures:
        return ["", f"GGUF {quant_type} general-text loss: {figures['forgetting_note']}"]
    line = (f"GGUF {quant_type} general-text loss (llama.cpp, same texts): {figures['forgetting_loss']:.4f}, "
            f"perplexity {figures['forgetting_perplexity']:.2f}")
    tuned = record.forgetting.finetuned if record.forgetting is not None else None
    if tuned is not None:
        line += f"; fine-tuned HF model {tuned.loss:.4f} ({figures['forgetting_loss'] - tuned.loss:+.4f})"
    return ["", line + "."]


def agreement_lines(record: RunRecord) -> list[str]:
    """How each smoke-tested GGUF's answers compare with the fine-tuned model's (one sentence each)."""
    if not record.exports:
        return []
    lines = []
    for key in ("gguf_unquantized", "gguf"):
        scores = record.eval.get(key)
        smoke = scores.info if scores is not None else {}
        if smoke.get("agreement_with_hf"):
            lines.append(f"\nGGUF {smoke.get('quant_type', '')} vs fine-tuned HF model on the same {scores.n} examples: "
                         f"ROUGE-1 {scores.rouge1:.2f} vs {smoke['hf_rouge1_same_examples']:.2f}, agreement (ROUGE-1 of "
                         f"GGUF answers against HF answers) {smoke['agreement_with_hf']['rouge1']:.2f}; "
                         f"{smoke['ended_at_eot']} of {scores.n} answers ended at end-of-turn.")
    return lines


QUANT_COLUMNS = ("type", "size", "ROUGE-1", "HF ROUGE-1", "change", "agreement", "tokens/s", "smoke")


def gguf_quantizations(record: RunRecord) -> list[dict]:
    """Each GGUF type the gguf exporter wrote, as ``{quant_type, size, smoke}`` with ``smoke`` the
    exporter's summary of its smoke test (None where it did not run). The exporter lists them under
    ``exports.gguf.quantizations`` when it wrote several types; a single type is read from
    ``eval.gguf`` and the export's file size, so records of either kind give the same rows."""
    export = record.exports.get("gguf")
    info = export.info if export is not None else {}
    if info.get("quantizations"):
        return info["quantizations"]
    scores = record.eval.get("gguf")
    if (export is None or not export.as_json()) and scores is None:
        return []
    quant_type = (scores.info.get("quant_type") if scores is not None else None) or info.get("quant_type")
    size = export.sizes.get("gguf") if export is not None else None
    smoke = smoke_summary(scores.as_json() if scores is not None else None)  # eval.gguf as the smoke test wrote it
    return [{"quant_type": quant_type, "size": size, "smoke": smoke}]


def quantization_row(q: dict) -> list[str]:
    """One GGUF type (an entry of ``gguf_quantizations``) as the QUANT_COLUMNS cells: file size, the smoke
    test's ROUGE-1 against the references, the HF model's on the same examples, the difference,
    agreement (ROUGE-1 of the GGUF's answers against the HF model's) and llama.cpp's generated tokens/s."""
    smoke = q.get("smoke") or {}
    return [str(q.get("quant_type") or "?"), human_bytes(q.get("size")), _num(smoke.get("rouge1")),
            _num(smoke.get("hf_rouge1")), _change(smoke),
            _num(smoke.get("agreement_rouge1")), _num(smoke.get("tokens_per_second"), ".1f"),
            "not run" if not smoke else "passed" if smoke.get("passed") else "failed"]


def quantization_rows(record: RunRecord) -> list[list[str]]:
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


def quantization_lines(record: RunRecord) -> list[str]:
    quantizations = gguf_quantizations(record)
    if len(quantizations) < 2:  # one type: agreement_lines' sentence says it all
        return []
    n = smoke_examples(quantizations)
    return ["", f"Quantisation types compared (llama.cpp smoke test on {n or 'no'} examples; pick the smallest file "
                "that keeps the quality):", "", *markdown_table(QUANT_COLUMNS, [quantization_row(q) for q in quantizations])]


def print_quantization_table(record: RunRecord) -> None:
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


def comparison_lines(records: list[RunRecord]) -> list[str]:
    """Section "GGUF exports": one row per run and GGUF type, the columns of a run's own quantisation
    table; nothing when no run has a GGUF."""
    rows = [row for record in records for row in comparison_rows(record)]
    if not rows:
        return []
    return COMPARISON_INTRO + markdown_table(["run", "exported on", "merged into", "examples", *QUANT_COLUMNS], rows,
                                             text_columns=3) + [""]


def comparison_rows(record: RunRecord) -> list[list[str]]:
    """One run's rows of section "GGUF exports": where its last export ran (or "in the run"), the
    weights a 4-bit adapter was merged into, the smoke test's examples, and a quantisation row per type."""
    exports_after_run = record.run_info.exports_after_run
    after = exports_after_run[-1] if exports_after_run else None
    method = record.run_info.recipe.method.options
    merge_into = (after.merge_into if after else None) or method.get("merge_into")
    if method.get("load_in_4bit") is False:  # a 16-bit base: merge_into did not apply (older exports recorded it)
        merge_into = None
    where = "in the run" if after is None else (after.device or "?") + (f": {after.cpu}" if after.cpu else "")
    quantizations = gguf_quantizations(record)
    examples = smoke_examples(quantizations)
    return [[record.name, where, merge_into or "—", str(examples or "—"), *quantization_row(q)] for q in quantizations]


# --- the terminal --------------------------------------------------------------------------------


def print_summary(record: RunRecord) -> None:
    """After a run or an export: the first GGUF's agreement with the HF model, and the table of types."""
    scores = record.eval.get("gguf")
    smoke = scores.info if scores is not None else {}
    if smoke.get("hf_rouge1_same_examples") is not None:
        console.print(f"GGUF {smoke.get('quant_type')}: ROUGE-1 {scores.rouge1:.2f} vs the HF model's "
                      f"{smoke['hf_rouge1_same_examples']:.2f} on the same {scores.n} examples, agreement "
                      f"{smoke['agreement_with_hf']['rouge1']:.2f}, {smoke['ended_at_eot']} of {scores.n} ended at end-of-turn")
    print_quantization_table(record)
