"""Markdown and terminal reports of one run (the report over many runs is peftbench/compare/report.py)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from peftbench.console import console
from peftbench.host import get_host
from peftbench.files import human_bytes
from peftbench.pipeline.environment import versions
from peftbench.pipeline.evaluation import ROUGE_CONVENTION, ROUGE_TYPES
from peftbench.pipeline.record import DatasetInfo, MetaInfo, RunRecord, Scores, Stage, SystemInfo, TrainInfo


# Rows of the ROUGE table for the HF model; exporters' scores (eval.<key>) follow, labelled by their plugin.
EVAL_LABELS = {"baseline": "base model", "finetuned": "fine-tuned"}


def rouge_rows(record: RunRecord) -> list[tuple[str, list[str]]]:
    """(label, [rouge1, rouge2, rougeL, rougeLsum, n]) for each evaluated model, in pipeline order: the base model,
    the fine-tuned one and the change, then what exporters scored (labelled by ``peftbench_score_label``)."""
    rows, evals = [], record.eval
    for key, label in EVAL_LABELS.items():
        if (scores := evals.get(key)) is not None:
            rows.append((label, _rouge_cells(scores)))
    base, tuned = evals.get("baseline"), evals.get("finetuned")
    if base and tuned:
        rows.append(("change", [f"{tuned.rouge(k) - base.rouge(k):+.2f}" for k in ROUGE_TYPES] + [""]))
    for key, scores in evals.items():
        if key not in EVAL_LABELS and not key.startswith("finetuned["):
            label = get_host().pm.hook.peftbench_score_label(key=key, scores=scores) or key
            rows.append((label, _rouge_cells(scores)))
    for key, scores in evals.items():
        if key.startswith("finetuned["):  # `peftbench evaluate`: the same adapter scored with other settings
            split = scores.settings.split if scores.settings else None
            label = f"fine-tuned, {key.removeprefix('finetuned[').removesuffix(']')}" + (f" ({split} split)" if split else "")
            rows.append((label, _rouge_cells(scores)))
    return rows


def _rouge_cells(scores: Scores) -> list[str]:
    return [f"{scores.rouge(k):.2f}" for k in ROUGE_TYPES] + [str(scores.n)]


def export_lines(record: RunRecord) -> list[str]:
    """Markdown: what each exporter wrote, how big, how long each step took."""
    if not record.exports:
        return []
    lines = ["", "| export | files | step times |", "| --- | --- | --- |"]
    for name, export in record.exports.items():
        files = ", ".join(f"{Path(path).name} ({human_bytes(export.sizes.get(label))})" for label, path in export.files.items())
        # An exporter's own record: step times under "times", or a merge's time alone (the merged exporter's)
        info = export.info
        times = info.get("times") or ({"merge_s": info["merge_s"]} if "merge_s" in info else {})
        steps = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v} s" for k, v in times.items())
        lines.append(f"| {name} | {files} | {steps} |")
    return lines


def plugin_sections(record: RunRecord) -> list[str]:
    """What plugins add to a run's report (``peftbench_run_report_sections``, given the typed record),
    below its exports."""
    return [line for lines in get_host().pm.hook.peftbench_run_report_sections(record=record) for line in lines]


def markdown_table(header, rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table's lines: the first ``text_columns`` columns left-aligned, the figures after them
    right-aligned."""
    return (["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + " |"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def render_run_report(record: RunRecord) -> str:
    """report.md of one run."""
    lines = _summary_lines(record)
    lines += forgetting_lines(record)
    lines += export_lines(record)
    lines += plugin_sections(record)
    lines += _training_lines(record.train_info)
    lines += _stage_lines(record.run_info.stages)
    lines += _environment_lines(record.meta_info)
    return "\n".join(lines) + "\n"


def _summary_lines(record: RunRecord) -> list[str]:
    info, data = record.run_info, record.meta_info.dataset_info or DatasetInfo()
    recipe = info.recipe
    lines = [
        f"# peftbench run: {info.experiment_name}",
        "",
        f"Method **{recipe.method.name}** on **{record.model_name}**, dataset **{recipe.dataset.name}** "
        f"(scored on {data.eval_split}, {data.eval_rows} examples).",
        "",
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rouge_rows(record)]
    return lines + ["", ROUGE_CONVENTION]


def forgetting_lines(record: RunRecord) -> list[str]:
    """Markdown: the loss on general text before and after fine-tuning (none for a record without it)."""
    forgetting = record.forgetting
    if forgetting is None:
        return []
    rows = [[label, f"{tl.loss:.4f}", f"{tl.perplexity:.2f}", str(tl.tokens)]
            for label, tl in (("base model", forgetting.base), ("fine-tuned", forgetting.finetuned)) if tl is not None]
    if forgetting.change is not None:
        se = f" ± {forgetting.change_se:.4f}" if forgetting.change_se is not None else ""
        rows.append(["change", f"{forgetting.change:+.4f}{se}", "", ""])
    lines = ["", f"Forgetting: language-modelling loss (nats per token) on {forgetting.n_texts} general texts "
             f"({forgetting.texts}), outside the task; the change is paired text by text (± standard error).", ""]
    lines += markdown_table(["model", "general-text loss", "perplexity", "tokens"], rows)
    return lines + ([""] + [f"- {note}" for note in forgetting.notes] if forgetting.notes else [])


def _training_lines(train: TrainInfo) -> list[str]:
    return [
        "",
        "| training | value |",
        "| --- | ---: |",
        f"| trainable parameters | {train.num_trainable_params or 0:,} of {train.num_total_params or 0:,} "
        f"({train.trainable_percent or 0:.3f}%) |",
        f"| adapter size | {human_bytes(train.file_size)} |",
        f"| steps | {train.steps} |",
        f"| global batch | {train.global_batch_size} examples per step over {train.num_processes or 1} process(es) |",
        f"| train time | {_or_resumed(train, 'train_time', ' s')} |",
        f"| non-pad tokens/s | {_or_resumed(train, 'tokens_per_second')} |",
        f"| final loss | {_fmt(train.final_loss)} |",
        f"| peak memory | {human_bytes(train.accelerator_memory_max)} |",
    ]


def _stage_lines(stages: dict[str, Stage]) -> list[str]:
    lines = ["", "| stage | status | seconds |", "| --- | --- | ---: |"]
    for name, st in stages.items():
        status = st.status + (f": {st.error}" if st.error else "")
        lines.append(f"| {name} | {status} | {'' if st.seconds is None else st.seconds} |")
    return lines


def _environment_lines(meta: MetaInfo) -> list[str]:
    system, pkgs = meta.system_info or SystemInfo(), versions(meta.package_info)
    lines = ["", f"Device: {system.accelerator or system.device} ({system.compute_dtype}), "
             + ", ".join(f"{k} {v}" for k, v in pkgs.items() if v)]
    if meta.policy_substitutions:
        lines += ["", "Substitutions: " + "; ".join(meta.policy_substitutions)]
    return lines


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def print_rouge_table(record: RunRecord) -> None:
    split = (record.meta_info.dataset_info or DatasetInfo()).eval_split
    table = Table(title=f"ROUGE on {split} split")
    for col in ("model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "n"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, vals in rouge_rows(record):
        table.add_row(label, *vals)
    console.print(table)


def print_run_summary(record: RunRecord, run_dir: Path) -> None:
    print_rouge_table(record)
    print_plugin_summaries(record)
    console.print(f"Run written to [bold]{run_dir}[/] (run.json, report.md, adapter/, predictions)")


def print_plugin_summaries(record: RunRecord) -> None:
    """What plugins print of a run's or an export's results (``peftbench_print_run_summary``, given the typed record)."""
    get_host().pm.hook.peftbench_print_run_summary(record=record)


def _or_resumed(train: TrainInfo, key: str, unit: str = "") -> str:
    value = getattr(train, key)
    if value is None and train.resumed_from_step is not None:
        return f"unknown (resumed from step {train.resumed_from_step})"
    return f"{value}{unit}"
