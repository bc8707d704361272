"""Dataset plugins: ``samsum`` (hub or local copy) and ``chatsum`` (the bundled offline set).

Local copies may be the original release (JSON arrays ``train.json``/``val.json``/``test.json``),
JSON Lines, CSV or parquet files, a folder of them, or a ``save_to_disk`` folder. datasets reads every
format; this module only finds the splits, normalises line endings, drops empty dialogues (SAMSum's
train split has one) and samples with a seed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from peftbench.api import DatasetPlugin, LoadedDataset, Options, PeftbenchError, hookimpl

SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "dev": "validation", "test": "test"}
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUNDLED = Path(__file__).parent / "data" / "chatsum"


class SamsumOptions(Options):
    path: str = Field("knkarthick/samsum", description="hub dataset id, or a local file or folder")
    max_samples: dict[str, int] = Field(
        default_factory=dict, description="rows kept per split after a seeded shuffle, e.g. {train: 1000}"
    )
    dialogue_column: str = Field("dialogue", description="column holding the conversation")
    summary_column: str = Field("summary", description="column holding the reference summary")


def _split_name(stem: str) -> str | None:
    for part in reversed(stem.lower().replace("-", "_").split("_")):
        if part in SPLIT_ALIASES:
            return SPLIT_ALIASES[part]
    return None


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {_split_name(path.stem) or "train": path}
    files = {}
    for f in sorted(path.iterdir()):
        split = _split_name(f.stem)
        if f.suffix in FORMATS and split and split not in files:
            files[split] = f
    return files


def load_splits(path_or_id: str):
    """Read a DatasetDict from a hub id or a local file/folder, splits named train/validation/test."""
    import datasets

    path = Path(path_or_id).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.exists():
        files = _local_files(path)
        if not files:
            raise PeftbenchError(
                f"no train/val/test files (.json, .jsonl, .csv, .parquet) in '{path}'.",
                "name the files train/validation/test (val.json as in the original release works too).",
            )
        kinds = {FORMATS[f.suffix] for f in files.values()}
        if len(kinds) > 1:
            raise PeftbenchError(f"mixed file formats in '{path}'.", "keep all splits in one format.")
        for file in files.values():
            _check_readable(file)
        return datasets.load_dataset(kinds.pop(), data_files={k: str(v) for k, v in files.items()})
    try:
        loaded = datasets.load_dataset(path_or_id)
    except Exception as e:  # hub errors come in many types: connection, not found, gated...
        raise PeftbenchError(
            f"could not load dataset '{path_or_id}' from the hub ({type(e).__name__}).",
            "check the id and your network, or set dataset.path to a local file or folder.",
        ) from None
    return datasets.DatasetDict({SPLIT_ALIASES.get(k, k): v for k, v in loaded.items()})


def _check_readable(file: Path) -> None:
    """Problems datasets reports as tracebacks (StopIteration, DatasetGenerationError), named here."""
    import json

    if file.stat().st_size == 0:
        raise PeftbenchError(f"'{file}' is empty.", "point dataset.path at a file with one example per line or row.")
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise PeftbenchError(f"line {number} of '{file}' is not valid JSON ({e.msg}).",
                                         "fix or remove that line: JSONL holds one JSON object per line.") from None
    if file.suffix == ".csv":
        with open(file, encoding="utf-8", errors="replace") as f:
            header = f.readline()
        if "," not in header and ";" in header:
            raise PeftbenchError(f"'{file}' looks ';'-separated (its header is {header.strip()!r}); peftbench reads "
                                 "comma-separated CSV.", "save it comma-separated, or as JSONL.")


def prepare(splits, options: SamsumOptions, seed: int) -> LoadedDataset:
    import datasets

    out, stats = {}, {"dropped_empty": {}, "rows": {}}
    for name, split in splits.items():
        if name not in ("train", "validation", "test"):
            continue
        missing = {options.dialogue_column, options.summary_column} - set(split.column_names)
        if missing:
            raise PeftbenchError(
                f"split '{name}' has no column(s) {sorted(missing)} (it has {split.column_names}).",
                "set dataset.dialogue_column / dataset.summary_column to the right names.",
            )
        if "id" not in split.column_names:
            split = split.add_column("id", [f"{name}-{i}" for i in range(len(split))])
        split = split.map(
            lambda ex: {
                "id": str(ex["id"]),
                "dialogue": (ex[options.dialogue_column] or "").replace("\r\n", "\n").strip(),
                "summary": (ex[options.summary_column] or "").replace("\r\n", "\n").strip(),
            },
            desc=f"normalising {name}",
        )
        split = split.select_columns(["id", "dialogue", "summary"])
        before = len(split)
        split = split.filter(lambda ex: bool(ex["dialogue"]) and bool(ex["summary"]))
        stats["dropped_empty"][name] = before - len(split)
        limit = options.max_samples.get(name)
        if limit is not None and limit < len(split):
            split = split.shuffle(seed=seed).select(range(limit))
        stats["rows"][name] = len(split)
        out[name] = split
    if "train" not in out:
        raise PeftbenchError("the dataset has no train split.", "provide a train file (train.jsonl, train.json, ...).")
    if not len(out["train"]):
        raise PeftbenchError(f"every row of the train split has an empty dialogue or summary "
                             f"({stats['dropped_empty']['train']} dropped).",
                             "check dataset.dialogue_column / dataset.summary_column and the file's contents.")
    unknown = set(options.max_samples) - {"train", "validation", "test"}
    if unknown:
        raise PeftbenchError(f"dataset.max_samples names unknown split(s) {sorted(unknown)}.", "use train, validation or test.")
    return LoadedDataset(datasets.DatasetDict(out), stats)


class Samsum(DatasetPlugin):
    """SAMSum dialogue summarisation (Gliwa et al., 2019), from the hub or a local copy."""

    name = "samsum"
    Options = SamsumOptions

    def load(self, options: SamsumOptions, seed: int) -> LoadedDataset:
        return prepare(load_splits(options.path), options, seed)


class ChatsumOptions(Options):
    max_samples: dict[str, int] = Field(default_factory=dict, description="rows kept per split after a seeded shuffle")


class Chatsum(DatasetPlugin):
    """The bundled offline set: messenger-style dialogues with SAMSum-style summaries, written for
    peftbench (CC BY 4.0, see data/chatsum/LICENSE)."""

    name = "chatsum"
    Options = ChatsumOptions

    def load(self, options: ChatsumOptions, seed: int) -> LoadedDataset:
        return prepare(load_splits(str(BUNDLED)), SamsumOptions(path=str(BUNDLED), max_samples=options.max_samples), seed)


@hookimpl
def peftbench_register_datasets(register):
    register(Samsum)
    register(Chatsum)
