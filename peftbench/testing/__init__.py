"""pytest plugin for peftbench and its plugin authors (auto-loaded through the ``pytest11`` entry point).

Fixtures give a tiny Llama-architecture chat model (random weights, the SmolLM2 tokenizer and chat
template) and a tiny dialogue dataset, so a plugin runs through the real pipeline in seconds.
Heavy imports happen inside fixtures, so merely having peftbench installed costs pytest nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peftbench.testing.conformance import MethodConformance  # re-exported for plugin authors
from peftbench.testing.tiny import (OFFLINE_GGUF, TINY_MODEL_SHAPE, build_tiny_model, read_jsonl, tiny_recipe,
                                    write_tiny_dataset)

__all__ = ["MethodConformance", "OFFLINE_GGUF", "TINY_MODEL_SHAPE", "build_tiny_model", "read_jsonl",
           "tiny_recipe", "write_tiny_dataset"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama chat model saved as safetensors (session-wide, built once)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/validation/test JSONL files with 16/4/4 dialogues."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir, tiny_data_dir):
    """Write a tiny recipe (overridable per section) to a YAML file and return its path."""
    import yaml

    def _write(method: dict | None = None, **sections) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data_dir, method, **sections)))
        return path

    return _write
