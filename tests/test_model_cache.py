"""The dequantise-once model cache shared by runs that start side by side (``--jobs N``)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from peftbench.pipeline import modeling


def _slow_fake_dequantise(source: str, gguf_file: str, target: Path) -> None:
    """Stands in for transformers' GGUF loading: slow enough that every process asks while the first
    is still writing, and it counts how many times it ran."""
    with open(Path(source) / "dequantise-calls", "a") as calls:
        calls.write("1\n")
    time.sleep(0.5)
    tmp = target.parent / f".tmp-{target.name}"
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"weights")
    tmp.rename(target)


def _ask_for_the_model(gguf: str, cache: str, results) -> None:
    import os

    os.environ["PEFTBENCH_CACHE"] = cache
    modeling._save_dequantised = _slow_fake_dequantise
    target = modeling.materialise_gguf(Path(gguf))
    results.put((str(target), sorted(p.name for p in target.iterdir())))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to share the fake")
def test_runs_started_together_dequantise_once_and_all_get_the_whole_checkpoint(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_ask_for_the_model, args=(str(gguf), str(cache), results)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * 6
    answers = [results.get(timeout=5) for _ in processes]
    assert (tmp_path / "dequantise-calls").read_text() == "1\n"  # one process wrote it, five waited and reused it
    assert len({path for path, _ in answers}) == 1
    assert all(files == ["config.json", "model.safetensors"] for _, files in answers)


def test_a_cache_folder_without_weights_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    partial = modeling._cache_dir_for(gguf)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # left by an interrupted older writer
    written = []

    def fake(source, gguf_file, target):
        written.append(target)
        (target / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(modeling, "_save_dequantised", fake)
    assert modeling.materialise_gguf(gguf) == partial
    assert written == [partial]
    assert modeling.materialise_gguf(gguf) == partial and written == [partial]  # complete now: reused


def test_a_gguf_validated_for_many_runs_is_read_once_per_version(tmp_path, monkeypatch):
    """A comparison validates each run's recipe (43 for compare_samsum) against the same GGUF; reading
    it each time cost about 10 s a read with SmolLM2 and kept an H200 idle for minutes."""
    import gguf

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    reads = []

    class CountingReader:
        def __init__(self, path):
            reads.append(path)
            self.tensors = []

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    assert [modeling.local_model_problem(model) for _ in range(43)] == [None] * 43
    assert reads == [str(model)]
    model.write_bytes(b"GGUF" + bytes(61))  # a new version of the file is read again
    assert modeling.local_model_problem(model) is None and len(reads) == 2
    model.write_bytes(b"text" + bytes(61))
    assert "is not a GGUF file" in modeling.local_model_problem(model)
