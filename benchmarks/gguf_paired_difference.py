"""How sure is a GGUF's ROUGE-1 change against its HF model? The paired standard error.

    python benchmarks/gguf_paired_difference.py runs/compare_samsum/lora-...-seed1 [RUN_DIR ...]

For each run directory and each predictions_gguf*.jsonl in it (what `peftbench run`/`peftbench export`
wrote), scores every example's GGUF answer and HF answer (predictions_finetuned.jsonl) against the
reference with ROUGE-1 (rouge-score, Porter stemmer, as the reports), and prints the mean of the
per-example differences (the report's "change") with its standard error (stdev / sqrt(n)). The same
examples are answered by both models, so the paired error is far smaller than either score's spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rouge_score import rouge_scorer


def read(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)

    def rouge1(row: dict) -> float:
        return 100 * scorer.score(row["reference"], row["prediction"])["rouge1"].fmeasure

    print("| run | file | n | change | standard error |\n| --- | --- | ---: | ---: | ---: |")
    for run in args.run_dirs:
        hf = read(run / "predictions_finetuned.jsonl")
        for path in sorted(run.glob("predictions_gguf*.jsonl")):
            diffs = [rouge1(row) - rouge1(hf[i]) for i, row in read(path).items()]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            print(f"| {run.name} | {path.name} | {len(diffs)} | {statistics.fmean(diffs):+.2f} | {se:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
