"""The ranking's paired bootstrap from predictions files, its fallback, and the CSV/JSON export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import record_fixtures as fixtures  # noqa: E402

from peftbench.compare.export import write_csv, write_json_folder  # noqa: E402
from peftbench.compare.report import load_runs, render_markdown  # noqa: E402

REFS = [f"alice meets bob at the park number {i} today" for i in range(30)]


def _runs(root: Path, good: list[str] | None, other: list[str] | None, scores=(46.0, 44.0)) -> Path:
    records = []
    for lr, score, preds in ((6e-3, scores[0], good), (2e-3, scores[1], other)):
        config = f"lora-lr{lr}"
        for seed in (1, 2):
            records.append(fixtures.record(f"{config}-seed{seed}", "lora", rouge1=score + 0.1 * seed, seed=seed, lr=lr,
                                           config=config, grid={"trainer.learning_rate": lr}))
    fixtures.write_runs(root, records)
    for run in records:
        name = run["run_info"]["experiment_name"]
        preds = good if "0.006" in name else other
        if preds is not None:
            lines = [json.dumps({"id": str(i), "prediction": p, "reference": r}) for i, (p, r) in enumerate(zip(preds, REFS))]
            (root / name / "predictions_finetuned.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _ranking_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| 2 |")]


def test_better_on_every_example_is_not_a_tie(tmp_path):
    worse = [r.split(" number")[0] for r in REFS]  # loses words on every example
    markdown = render_markdown(load_runs([_runs(tmp_path, REFS, worse)]), title="t")
    row = _ranking_rows(markdown)[0]
    assert "worse (interval excludes 0)" in row and "tie" not in row
    assert "paired bootstrap" in markdown and "No predictions files" not in markdown


def test_identical_predictions_are_a_tie_of_zero_width(tmp_path):
    markdown = render_markdown(load_runs([_runs(tmp_path, REFS, REFS)]), title="t")
    row = _ranking_rows(markdown)[0]
    assert "+0.00 [+0.00, +0.00], tie (interval covers 0)" in row


def test_report_is_deterministic(tmp_path):
    half = [r if i % 2 else "bob" for i, r in enumerate(REFS)]
    root = _runs(tmp_path, REFS, half)
    assert render_markdown(load_runs([root]), title="t") == render_markdown(load_runs([root]), title="t")


def test_without_predictions_the_seed_spread_rule_and_a_note(tmp_path):
    markdown = render_markdown(load_runs([_runs(tmp_path, None, None)]), title="t")
    assert "worse (beyond ±" in _ranking_rows(markdown)[0]
    assert "No predictions files (predictions_finetuned.jsonl)" in markdown


def test_csv_round_trips_with_pandas(tmp_path):
    import pandas as pd

    runs = load_runs([_runs(tmp_path / "runs", None, None)])
    frame = pd.read_csv(write_csv(runs, tmp_path / "out.csv"))
    assert len(frame) == 4
    assert list(frame.columns[:5]) == ["run", "config", "method", "seed", "grid.trainer.learning_rate"]
    for col in ("rouge1", "rouge2", "rougeL", "rougeLsum", "n", "trainable_params", "train_time_s",
                "tokens_per_second", "peak_memory_bytes", "status"):
        assert col in frame.columns
    row = frame[frame.run == "lora-lr0.006-seed1"].iloc[0]
    assert row.rouge1 == 46.1 and row.seed == 1 and row.status == "success" and row.n == 818


def test_json_folder_holds_one_run_json_per_run(tmp_path):
    runs = load_runs([_runs(tmp_path / "runs", None, None)])
    folder = write_json_folder(runs, tmp_path / "json")
    files = sorted(folder.glob("*.json"))
    assert len(files) == 4
    data = json.loads(files[0].read_text())
    assert {"run_info", "train_info", "meta_info"} <= set(data)


def test_json_folder_has_the_fields_peft_method_comparison_reads(tmp_path):
    """huggingface/peft method_comparison/processing.py reads every *.json of a folder and these fields."""
    runs = load_runs([_runs(tmp_path / "runs", None, None)])
    for path in write_json_folder(runs, tmp_path / "json").glob("*.json"):
        row = json.loads(path.read_text())
        run, train, meta = row["run_info"], row["train_info"], row["meta_info"]
        assert train["status"] == "success"
        for key in ("experiment_name", "total_time", "peft_branch", "created_at", "peft_config"):
            assert key in run
        assert "model_id" in run["train_config"]
        for key in ("accelerator_memory_reserved_avg", "accelerator_memory_max", "accelerator_memory_reserved_99th",
                    "train_time", "file_size"):
            assert key in train
        assert {"test accuracy", "train loss", "train samples", "train total tokens"} <= set(train["metrics"][-1])
        assert {"peft-version", "transformers-version", "datasets-version", "torch-version",
                "bitsandbytes-version"} <= set(meta["package_info"])
        assert "system_info" in meta
