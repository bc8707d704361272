"""The comparison as data: one row per run (``peftbench report ... --csv FILE``) with pandas, and a
folder of per-run JSON files (``--json DIR``) in the layout of each run's run.json, which follows
huggingface/peft's method_comparison results (run_info / train_info / meta_info, one file per run)."""

from __future__ import annotations

import json
from pathlib import Path

from peftbench.compare.report import Run, config_label, group_runs, run_metrics
from peftbench.errors import PeftbenchError
from peftbench.files import atomic_write_text
from peftbench.pipeline.evaluation import ROUGE_TYPES

COLUMNS = ["run", "config", "method", "seed", *ROUGE_TYPES, "n", "trainable_params", "train_time_s",
           "tokens_per_second", "peak_memory_bytes", "status"]


def comparison_rows(runs: list[Run]) -> list[dict]:
    """One dict per run, sorted by run name; grid values as ``grid.<key>`` columns."""
    labels = {r.name: g.label for g in group_runs(runs) for r in g.runs}
    rows = []
    for run in sorted(runs, key=lambda r: r.name):
        metrics, tuned = run_metrics(run.record), run.record.eval.get("finetuned")
        row = {"run": run.name, "config": labels.get(run.name, config_label(run.entry_label, run.grid)),
               "method": run.method, "seed": run.record.run_info.recipe.seed}
        row |= {f"grid.{k}": v for k, v in run.grid.items()}
        row |= {k: metrics.get(k) for k in ROUGE_TYPES}
        row |= {"n": getattr(tuned, "n", None) if tuned else None, "trainable_params": metrics.get("trainable"),
                "train_time_s": metrics.get("train_time"), "tokens_per_second": metrics.get("tokens_per_second"),
                "peak_memory_bytes": metrics.get("peak_memory"), "status": run.status}
        rows.append(row)
    return rows


def write_csv(runs: list[Run], path: str | Path) -> Path:
    import pandas as pd

    rows = comparison_rows(runs)
    grid = sorted({k for row in rows for k in row if k.startswith("grid.")})
    frame = pd.DataFrame(rows, columns=COLUMNS[:4] + grid + COLUMNS[4:])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, frame.to_csv(index=False))  # a kill never leaves half a table
    return path


def write_json_folder(runs: list[Run], folder: str | Path) -> Path:
    """One ``<run name>.json`` per run (slashes become '--'), each the run's record as run.json holds it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PeftbenchError(f"--json '{folder}' is a file.", "pass a folder to write one JSON per run into.")
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs:
        name = run.name.replace("/", "--") + ".json"
        atomic_write_text(folder / name, json.dumps(run.record.as_json(), indent=2, sort_keys=True) + "\n")
    return folder
