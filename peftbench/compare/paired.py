"""The ranking's paired comparison: per-example ROUGE-1 from each run's predictions_finetuned.jsonl,
and a paired bootstrap (compare/significance.py) of a configuration against the best, over the
examples both share and the seeds of each. A configuration without predictions files (old runs,
constructed records) gets None, and the report falls back to the seeds' spread."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from peftbench.compare.significance import PairedDifference, paired_bootstrap

PREDICTIONS = "predictions_finetuned.jsonl"
BOOTSTRAP_SEED = 0  # fixed: the same runs always give the same report


@functools.lru_cache(maxsize=None)
def predictions_rouge1(path: str) -> dict[str, float]:
    """id -> ROUGE-1 F (percent) of one predictions file, with the scorer pipeline/evaluation.py uses."""
    from peftbench.pipeline.evaluation import example_rouge1 as score

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    scores = score([row["prediction"] for row in rows], [row["reference"] for row in rows])
    return {str(row["id"]): value for row, value in zip(rows, scores)}


def seed_scores(directories: list[Path | None]) -> list[dict[str, float]] | None:
    """Each seed's id -> score, or None when any run lacks a readable predictions file."""
    out = []
    for directory in directories:
        path = directory / PREDICTIONS if directory is not None else None
        if path is None or not path.is_file():
            return None
        try:
            out.append(predictions_rouge1(str(path.resolve())))
        except (ValueError, KeyError, TypeError):
            return None
    return out or None


def against(a: list[dict[str, float]], b: list[dict[str, float]]) -> PairedDifference | None:
    """``a - b`` over the examples every seed of both answered; None when they share none."""
    shared = sorted(set.intersection(*(set(s) for s in a + b)))
    if not shared:
        return None
    return paired_bootstrap([[s[i] for i in shared] for s in a], [[s[i] for i in shared] for s in b],
                            seed=BOOTSTRAP_SEED)
