"""Markdown and terminal reports of one run (the report over many runs is peftbench/compare/report.py)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from peftbench.console import console
from peftbench.pipeline.evaluation import ROUGE_CONVENTION, ROUGE_TYPES
from peftbench.files import human_bytes
from peftbench.pipeline.environment import versions


def rouge_rows(record: dict) -> list[tuple[str, list[str]]]:
    """(label, [rouge1, rouge2, rougeL, rougeLsum, n]) for each evaluated model, in pipeline order."""
    rows = []
    labels = {"baseline": "base model", "finetuned": "fine-tuned", "gguf_unquantized": "GGUF", "gguf": "GGUF"}
    for key, label in labels.items():
        scores = record.get("eval", {}).get(key)
        if scores:
            if key.startswith("gguf"):  # the GGUF scores sit under the HF ones, labelled with their type
                label = f"{label} {scores.get('quant_type', '')} (llama.cpp)".replace("  ", " ")
            rows.append((label, [f"{scores[k]:.2f}" for k in ROUGE_TYPES] + [str(scores["n"])]))
        base, tuned = record["eval"].get("baseline"), record["eval"].get("finetuned")
        if key == "finetuned" and base and tuned:
            rows.append(("change", [f"{tuned[k] - base[k]:+.2f}" for k in ROUGE_TYPES] + [""]))
    for key, scores in record.get("eval", {}).items():
        if key.startswith("finetuned["):  # `peftbench evaluate`: the same adapter scored with other settings
            split = (scores.get("settings") or {}).get("split")
            label = f"fine-tuned, {key.removeprefix('finetuned[').removesuffix(']')}" + (f" ({split} split)" if split else "")
            rows.append((label, [f"{scores[k]:.2f}" for k in ROUGE_TYPES] + [str(scores["n"])]))
    return rows


def export_lines(record: dict) -> list[str]:
    """Markdown: what each exporter wrote, how big, how long each step took."""
    exports = record.get("exports") or {}
    if not exports:
        return []
    lines = ["", "| export | files | step times |", "| --- | --- | --- |"]
    for name, export in exports.items():
        files = ", ".join(f"{Path(path).name} ({human_bytes(export.get('sizes', {}).get(label))})"
                          for label, path in export.get("files", {}).items())
        times = export.get("times") or ({"merge_s": export["merge_s"]} if "merge_s" in export else {})
        steps = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v} s" for k, v in times.items())
        lines.append(f"| {name} | {files} | {steps} |")
    return lines


def plugin_sections(record: dict) -> list[str]:
    """What plugins add to a run's report (``peftbench_run_report_sections``), below its exports."""
    from peftbench.host import get_host

    return [line for lines in get_host().pm.hook.peftbench_run_report_sections(record=record) for line in lines]


def markdown_table(header, rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table's lines: the first ``text_columns`` columns left-aligned, the figures after them
    right-aligned."""
    return (["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + " |"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def render_run_report(record: dict) -> str:
    info, train, meta = record["run_info"], record["train_info"], record["meta_info"]
    recipe = info["recipe"]
    lines = [
        f"# peftbench run: {info['experiment_name']}",
        "",
        f"Method **{recipe['method']['name']}** on **{meta.get('model_id')}**, dataset **{recipe['dataset']['name']}** "
        f"(scored on {meta.get('dataset_info', {}).get('eval_split')}, {meta.get('dataset_info', {}).get('eval_rows')} examples).",
        "",
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rouge_rows(record)]
    lines += ["", ROUGE_CONVENTION]
    lines += export_lines(record)
    lines += plugin_sections(record)
    lines += [
        "",
        "| training | value |",
        "| --- | ---: |",
        f"| trainable parameters | {train.get('num_trainable_params', 0):,} of {train.get('num_total_params', 0):,} ({train.get('trainable_percent', 0):.3f}%) |",
        f"| adapter size | {human_bytes(train.get('file_size'))} |",
        f"| steps | {train.get('steps')} |",
        f"| global batch | {train.get('global_batch_size')} examples per step over {train.get('num_processes', 1)} process(es) |",
        f"| train time | {_or_resumed(train, 'train_time', ' s')} |",
        f"| non-pad tokens/s | {_or_resumed(train, 'tokens_per_second')} |",
        f"| final loss | {_fmt(train.get('final_loss'))} |",
        f"| peak memory | {human_bytes(train.get('accelerator_memory_max'))} |",
        "",
        "| stage | status | seconds |",
        "| --- | --- | ---: |",
    ]
    for name, st in info["stages"].items():
        status = st["status"] + (f": {st['error']}" if st.get("error") else "")
        lines.append(f"| {name} | {status} | {st.get('seconds', '')} |")
    sysinfo, pkgs = meta.get("system_info", {}), versions(meta.get("package_info", {}))
    lines += [
        "",
        f"Device: {sysinfo.get('accelerator') or sysinfo.get('device')} ({sysinfo.get('compute_dtype')}), "
        + ", ".join(f"{k} {v}" for k, v in pkgs.items() if v),
    ]
    if meta.get("policy_substitutions"):
        lines += ["", "Substitutions: " + "; ".join(meta["policy_substitutions"])]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def print_rouge_table(record: dict) -> None:
    table = Table(title=f"ROUGE on {record['meta_info'].get('dataset_info', {}).get('eval_split')} split")
    for col in ("model", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "n"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, vals in rouge_rows(record):
        table.add_row(label, *vals)
    console.print(table)


def print_run_summary(record: dict, run_dir: Path) -> None:
    print_rouge_table(record)
    from peftbench.host import get_host

    get_host().pm.hook.peftbench_print_run_summary(record=record)
    console.print(f"Run written to [bold]{run_dir}[/] (run.json, report.md, adapter/, predictions)")


def _or_resumed(train: dict, key: str, unit: str = "") -> str:
    if train.get(key) is None and train.get("resumed_from_step") is not None:
        return f"unknown (resumed from step {train['resumed_from_step']})"
    return f"{train.get(key)}{unit}"
