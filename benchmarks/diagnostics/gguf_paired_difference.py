"""How sure is a GGUF's ROUGE-1 change against its HF model? The paired standard error.

    python benchmarks/diagnostics/gguf_paired_difference.py runs/compare_samsum/lora-...-seed1 [RUN_DIR ...]

For each run directory and each predictions_gguf*.jsonl in it (what `peftbench run`/`peftbench export`
wrote), compares every example's GGUF answer with its HF answer (predictions_finetuned.jsonl) through
``peftbench.pipeline.evaluation.paired_rouge1_change``, which the smoke test records since 2026-12-04:
the mean of the per-example ROUGE-1 differences (the report's "change") with its standard error. For
runs exported before the smoke test recorded it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftbench.pipeline.evaluation import paired_rouge1_change


def read(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| run | file | n | change | standard error |\n| --- | --- | ---: | ---: | ---: |")
    for run in args.run_dirs:
        hf = read(run / "predictions_finetuned.jsonl")
        for path in sorted(run.glob("predictions_gguf*.jsonl")):
            gguf = list(read(path).values())
            change = paired_rouge1_change([row["prediction"] for row in gguf], [hf[row["id"]]["prediction"] for row in gguf],
                                          [row["reference"] for row in gguf])
            print(f"| {run.name} | {path.name} | {change['n']} | {change['change']:+.2f} | {change['standard_error']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
