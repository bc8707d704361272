"""llama.cpp through llama-cpp-python: loading a GGUF, and the tokenizer calls peftbench's prompts
need, answered from the file alone.

Every function here runs native code that may crash the process: callers run it in a child process
(``kit.run_isolated``), where a crash becomes one NativeCrash with ``LLAMA_CRASH_FIX``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from peftbench.api import PeftbenchError
from peftbench.kit import cpu_flags
from peftbench_plugins.gguf.compat import model_params_with_extra_buffers
from peftbench_plugins.gguf.gguf_file import GGUF_FIX, require_gguf_file

LLAMA_CRASH_FIX = ("run `peftbench doctor`; set PEFTBENCH_LLAMA_EXTRA_BUFFERS=0 (llama.cpp's CPU weight repacking), "
                   "or reinstall llama-cpp-python portably: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall "
                   "--no-cache-dir llama-cpp-python")


def use_extra_buffers() -> bool:
    """Whether llama.cpp may repack weights into its CPU "extra buffer types" (AMX, AVX-512 layouts).

    A llama-cpp-python built natively (GGML_NATIVE=ON, its default) on a CPU with AMX compiles in
    llama.cpp's AMX buffer type, and dies with a segmentation fault in the first prompt of more than a
    few tokens on any quantised GGUF while it is on. The README installs a portable build
    (GGML_NATIVE=OFF: AVX2, no AMX), whose repacking works; this default protects a native build
    installed some other way, at no cost that matters for a smoke test (benchmarks/README.md). Off on
    CPUs with AMX or AVX-512, on elsewhere; PEFTBENCH_LLAMA_EXTRA_BUFFERS=1 or 0 decides instead."""
    forced = os.environ.get("PEFTBENCH_LLAMA_EXTRA_BUFFERS")
    if forced in ("0", "1"):
        return forced == "1"
    return not (cpu_flags() & {"amx_int8", "amx_tile", "avx512f"})


def cpu_threads() -> int:
    """The cores this process may use (llama-cpp-python's default for decoding is half the logical
    CPUs: one thread on a 2-core machine)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_gguf(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False):
    """A llama_cpp.Llama for ``path``; problems become one-line PeftbenchErrors. ``threads``:
    llama.cpp's threads for decoding and prompts (default: llama-cpp-python's; on a busy machine more
    threads spin at llama.cpp's barriers, so the smoke test passes every core it may use). ``logits_all``: keep
    every position's logits (``llm.scores``), for scoring text rather than generating."""
    path = require_gguf_file(path)
    try:
        import llama_cpp
    except ImportError:
        raise PeftbenchError("llama-cpp-python is not installed.", GGUF_FIX) from None
    try:
        with model_params_with_extra_buffers(use_extra_buffers()):
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   logits_all=logits_all, verbose=False)
    except ValueError as e:  # llama-cpp-python reports every load failure as ValueError
        raise PeftbenchError(f"llama.cpp could not load '{path}': {e}", "re-export it; check it with `python -m gguf.scripts.gguf_dump`.") from None


def ends_generation(gguf: str, token_id: int, progress=None) -> bool:
    """Whether llama.cpp treats ``token_id`` as end of generation in ``gguf``."""
    import llama_cpp

    llm = load_gguf(gguf, n_ctx=64)
    try:
        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token_id))
    finally:
        llm.close()


def generate_text(gguf: str, prompt_text: str, max_tokens: int, progress=None) -> tuple[str, float]:
    """(greedy continuation of ``prompt_text``, seconds): the smallest real use of llama.cpp."""
    start = time.perf_counter()
    llm = load_gguf(gguf, n_ctx=2048)
    try:
        out = llm.create_completion(prompt_text, max_tokens=max_tokens, temperature=0.0)
    finally:
        llm.close()
    return out["choices"][0]["text"], time.perf_counter() - start


class GgufTokenizer:
    """What peftbench's prompt building (``kit.encode_prompt``) asks of a transformers tokenizer,
    answered from a GGUF: the chat template embedded in the file (rendered by llama-cpp-python's
    Jinja2ChatFormatter, the handler llama_cpp.Llama builds from the same metadata) and the file's
    own vocabulary. A prompt built from the GGUF can then only differ from the training prompt if
    the file's template or vocabulary differ."""

    def __init__(self, llm):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise PeftbenchError(
                "the GGUF has no chat template (tokenizer.chat_template).",
                "export from a checkpoint whose tokenizer has a chat template (peftbench's gguf exporter does).",
            )
        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.eos_token_id = llm.token_eos()
        self.bos_token_id = llm.token_bos()
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=self.token_text(self.eos_token_id),
                                             bos_token=self.token_text(self.bos_token_id), add_generation_prompt=True)
        self.markers = self._template_markers()

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id]) if token_id >= 0 else ""

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        if tokenize or not add_generation_prompt:
            raise NotImplementedError("GgufTokenizer renders generation prompts as text only")
        return self.formatter(messages=messages).prompt

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        # special=True: special-token text in the input becomes the special token, as transformers does.
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token_id: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token_id))

    def is_control(self, token_id: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_control(self.vocab, token_id))

    def _template_markers(self) -> list[str]:
        """Texts of the control tokens the chat template writes (<|im_start|>, <|im_end|>, ...)."""
        rendered = self.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        ids = self(rendered)["input_ids"]
        return sorted({self.token_text(t) for t in ids if self.is_control(t)} - {""})
