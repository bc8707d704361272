"""The samsum plugin reads every local format a user may have, with SAMSum's quirks."""

import json

import pytest

from peftbench.errors import PeftbenchError
from peftbench_plugins.datasets import Samsum, SamsumOptions

ROWS = [
    {"id": "1", "summary": "Amy will call Bob.", "dialogue": "Amy: I'll call u\r\nBob: ok"},
    {"id": "2", "summary": "Empty one.", "dialogue": ""},  # like SAMSum train id 13828807
    {"id": "3", "summary": "Bob bought milk. ", "dialogue": "Bob: got milk\nAmy: thx"},
    {"id": "4", "summary": "Cleo is late.", "dialogue": "Cleo: running late\r\nDan: np"},
]


def _load(path, **options):
    return Samsum().load(SamsumOptions(path=str(path), **options), seed=0)


def _check(loaded, splits=("train", "validation", "test")):
    for split in splits:
        ds = loaded.splits[split]
        assert ds.column_names == ["id", "dialogue", "summary"]
        assert len(ds) == 3, "the empty dialogue is dropped"
        assert all("\r" not in d for d in ds["dialogue"])
        assert ds[0]["dialogue"] == "Amy: I'll call u\nBob: ok"
        assert ds[1]["summary"] == "Bob bought milk."
        assert loaded.stats["dropped_empty"][split] == 1


def test_original_release_json_arrays(tmp_path):
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.json").write_text(json.dumps(ROWS))
    _check(_load(tmp_path))


def test_jsonl_folder(tmp_path):
    for name in ("train", "validation", "test"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check(_load(tmp_path))


def test_csv_folder(tmp_path):
    import csv

    for name in ("train", "validation", "test"):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
            writer.writeheader()
            writer.writerows(ROWS)
    _check(_load(tmp_path))


def test_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}).save_to_disk(str(tmp_path / "saved"))
    _check(_load(tmp_path / "saved"))


def test_single_file_is_the_train_split(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    loaded = _load(path)
    assert list(loaded.splits) == ["train"]
    _check(loaded, ("train",))


def test_sampling_is_seeded_and_per_split(tmp_path):
    rows = [{"id": str(i), "dialogue": f"A: {i}\nB: ok", "summary": f"A said {i}."} for i in range(50)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = Samsum().load(SamsumOptions(path=str(tmp_path), max_samples={"train": 10}), seed=1)
    again = Samsum().load(SamsumOptions(path=str(tmp_path), max_samples={"train": 10}), seed=1)
    other = Samsum().load(SamsumOptions(path=str(tmp_path), max_samples={"train": 10}), seed=2)
    assert len(first.splits["train"]) == 10
    assert first.splits["train"]["id"] == again.splits["train"]["id"]
    assert first.splits["train"]["id"] != other.splits["train"]["id"]


def test_missing_columns_and_folders_give_clear_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "1", "text": "x", "summary": "y"}) + "\n")
    with pytest.raises(PeftbenchError, match="dialogue_column"):
        _load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftbenchError, match="no train/val/test files"):
        _load(tmp_path / "empty")


def test_bundled_chatsum_has_three_splits_and_a_licence():
    from peftbench_plugins.datasets import BUNDLED, Chatsum, ChatsumOptions

    loaded = Chatsum().load(ChatsumOptions(), seed=0)
    sizes = {k: len(v) for k, v in loaded.splits.items()}
    assert sizes == {"train": 260, "validation": 40, "test": 60}
    assert sum(sizes.values()) >= 300
    assert "CC BY 4.0" in (BUNDLED / "LICENSE").read_text()
    ids = [i for split in loaded.splits.values() for i in split["id"]]
    assert len(ids) == len(set(ids))
