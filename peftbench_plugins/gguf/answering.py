"""The GGUF's answers to dialogues, built and cut exactly as peftbench's evaluation does for the HF
model: one at a time through ``Llama.generate`` (``summarise``), or several sequences decoded in one
llama.cpp batch (``BatchedAnswers``). ``answer_examples`` is the entry point a child process runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from peftbench.api import PeftbenchError
from peftbench.kit import encode_prompt
from peftbench_plugins.gguf.compat import context_params_like, context_share, keep_only_prefix, separate_kv_streams
from peftbench_plugins.gguf.llama import GgufTokenizer, cpu_threads, load_gguf

# An answer that has not reached end-of-turn after this many times the scored length is counted as
# not stopping by itself (the scored text is still the first max_new_tokens tokens, as for HF).
STOP_BUDGET_FACTOR = 4
# Sequences llama.cpp decodes together in one batch, per worker. One at a time by default: batches
# were slower on a CPU and changed answers (llama.cpp's CPU kernels round differently for different
# batch sizes); worker processes are the faster way to use every core (benchmarks/README.md).
SMOKE_PARALLEL = 1
# What ``BatchedAnswers`` times: seconds in prompts and in decoding steps, and what they held
# (benchmarks/bench_smoke.py prints them; ``smoke.answer_in_workers`` sums them over workers).
BATCH_TIMINGS = ("prompt_s", "prompt_tokens", "step_s", "steps", "step_tokens")


@dataclass
class Answer:
    id: str
    text: str  # the first max_new_tokens tokens, special tokens dropped: what ROUGE scores
    ended_at_eot: bool  # generation stopped at an end-of-generation token within the budget
    leaked: list[str]  # control tokens or template markers inside the answer
    tokens: int  # tokens generated before end-of-turn (or the budget)


def make_answer(tokenizer: GgufTokenizer, generated: list[int], ended: bool, max_new_tokens: int, ident: str) -> Answer:
    full_text = tokenizer.decode(generated)
    leaked = sorted({tokenizer.token_text(t) for t in generated if tokenizer.is_control(t)}
                    | {m for m in tokenizer.markers if m in full_text})
    text = tokenizer.decode(generated[:max_new_tokens], skip_special_tokens=True).strip()
    return Answer(id=ident, text=text, ended_at_eot=ended, leaked=leaked, tokens=len(generated))


def template_prefix(tokenizer: GgufTokenizer, prompt) -> list[int]:
    """The prompt tokens every dialogue shares (system prompt, instruction, turn headers before the
    dialogue): the common start of two prompts whose dialogues differ from their first character."""
    a, b = (encode_prompt(tokenizer, prompt, text) for text in ("A: hi", "B: hi"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def summarise(llm, tokenizer: GgufTokenizer, prompt, dialogue: str, max_new_tokens: int, ident: str = "",
              prefix: list[int] | None = None) -> Answer:
    """Greedy answer to one dialogue. ``prefix``: the template's shared tokens (``template_prefix``),
    decoded once and reused."""
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
    return make_answer(tokenizer, generated, ended, max_new_tokens, ident)


def answer_examples(gguf: str, examples: list[dict], prompt, max_new_tokens: int, parallel: int = SMOKE_PARALLEL,
                    progress=None, threads: int | None = None) -> dict:
    """The GGUF's answers to ``examples`` ({"answers", "generated_tokens", "decode_s", "parallel",
    "threads"}, and ``BATCH_TIMINGS`` when batched). ``parallel`` > 1 decodes that many sequences in
    one llama.cpp batch; 1 answers one at a time. ``threads``: llama.cpp's threads (default: every
    core this process may use). Runs llama.cpp in this process: call it through ``kit.run_isolated``."""
    n_ctx = prompt.max_source_tokens + STOP_BUDGET_FACTOR * max_new_tokens + 8
    threads = threads or cpu_threads()
    llm = load_gguf(gguf, n_ctx=n_ctx if parallel == 1 else 64, threads=threads)  # batched: its own context
    try:
        tokenizer = GgufTokenizer(llm)
        timings: dict = {}
        start = time.perf_counter()
        if parallel == 1:
            answers, prefix = [], template_prefix(tokenizer, prompt)
            for ex in examples:
                answers.append(summarise(llm, tokenizer, prompt, ex["dialogue"], max_new_tokens, ident=str(ex["id"]), prefix=prefix))
                if progress is not None:
                    progress(1)
        else:
            batched = BatchedAnswers(llm, tokenizer, prompt, examples, max_new_tokens, parallel, threads, progress)
            answers = batched.run(timings)
        decode_s = time.perf_counter() - start
    finally:
        llm.close()
    return {"answers": answers, "generated_tokens": sum(a.tokens for a in answers), "decode_s": decode_s,
            "parallel": parallel, "threads": threads, **timings}


class BatchedAnswers:
    """Greedy answers, ``parallel`` sequences decoded together (continuous batching, as llama.cpp's
    examples/parallel): one llama_decode call holds the next token of every running sequence; a
    finished sequence's KV cells are removed and the next example's prompt takes its sequence id.
    Prompts, stopping and cutting are ``summarise``'s.

    A prompt is decoded on its own, not in the same call as other sequences' next tokens: with one
    KV stream per sequence llama.cpp splits a mixed batch into equal-length pieces per sequence, and
    prompts decoded that way ran several times slower than alone."""

    def __init__(self, llm, tokenizer: GgufTokenizer, prompt, examples: list[dict], max_new_tokens: int,
                 parallel: int, threads: int, progress=None):
        import llama_cpp

        self.tokenizer, self.examples, self.max_new_tokens, self.progress = tokenizer, examples, max_new_tokens, progress
        self.budget = STOP_BUDGET_FACTOR * max_new_tokens
        self.prompts = [encode_prompt(tokenizer, prompt, ex["dialogue"]) for ex in examples]
        self.parallel = max(1, min(parallel, len(examples)))
        self.ctx, self.batch = self._context(llm, threads)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(tokenizer.vocab)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.answers: list[Answer | None] = [None] * len(examples)
        self.running: dict[int, dict] = {}  # seq id -> {"index", "generated", "pos", "next"}
        self.clock = dict.fromkeys(BATCH_TIMINGS, 0)

    def _context(self, llm, threads: int):
        """A context of ``parallel`` sequences computed like ``llm``'s own, and a batch for it."""
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        per_sequence = context_share(max(len(p) for p in self.prompts) + self.budget + 1)
        params = context_params_like(llm)
        separate_kv_streams(params, self.parallel)
        params.n_ctx = self.parallel * per_sequence
        params.n_batch = max(per_sequence, self.parallel)  # a whole prompt in one llama_decode call
        params.n_ubatch = min(512, params.n_batch)  # as llama_cpp.Llama: its pieces are computed like one-at-a-time prompts
        params.n_threads = params.n_threads_batch = threads
        ctx = LlamaContext(model=llm._model, params=params, verbose=False)
        return ctx, llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def run(self, timings: dict | None = None) -> list[Answer]:
        import llama_cpp

        pending = list(range(len(self.examples)))[::-1]  # popped from the end: examples in their order
        try:
            while pending or self.running:
                free = [seq for seq in range(self.parallel) if seq not in self.running]
                if free and pending:  # start the next example in a free sequence
                    self._start(free[0], pending.pop())
                else:
                    self._step()
        finally:
            if timings is not None:
                timings.update({k: round(v, 2) for k, v in self.clock.items()})
            llama_cpp.llama_batch_free(self.batch)
            self.ctx.close()
        return self.answers

    def _start(self, seq: int, index: int) -> None:
        """Decode example ``index``'s prompt in sequence ``seq`` and take its first token."""
        ids = self.prompts[index]
        started = time.perf_counter()
        self._decode([(token, pos, seq, pos == len(ids) - 1) for pos, token in enumerate(ids)])
        self.clock["prompt_s"] += time.perf_counter() - started
        self.clock["prompt_tokens"] += len(ids)
        self.running[seq] = {"index": index, "generated": [], "pos": len(ids)}
        self._take(seq, len(ids) - 1)

    def _step(self) -> None:
        """One llama_decode of every running sequence's next token."""
        order = list(self.running)
        started = time.perf_counter()
        self._decode([(self.running[seq]["next"], self.running[seq]["pos"], seq, True) for seq in order])
        self.clock["step_s"] += time.perf_counter() - started
        self.clock["steps"] += 1
        self.clock["step_tokens"] += len(order)
        for row, seq in enumerate(order):
            self.running[seq]["pos"] += 1
            self._take(seq, row)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq id, wants logits) entries."""
        import llama_cpp

        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        rc = llama_cpp.llama_decode(self.ctx.ctx, batch)
        if rc != 0:
            raise PeftbenchError(f"llama.cpp could not decode a batch of {len(tokens)} tokens (llama_decode returned {rc}).",
                                 "run the smoke test with one sequence at a time (parallel=1).")

    def _take(self, seq: int, row: int) -> None:
        """The greedy next token of ``seq`` from logits row ``row``; finish the sequence or go on."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, row), shape=(self.n_vocab,))
        token = int(np.argmax(logits))  # greedy: llama.cpp's greedy sampler also takes the first maximum
        state = self.running[seq]
        ended = self.tokenizer.is_end_of_generation(token)
        if not ended:
            state["generated"].append(token)
        if not ended and len(state["generated"]) < self.budget:
            state["next"] = token
            return
        index = state["index"]
        self.answers[index] = make_answer(self.tokenizer, state["generated"], ended, self.max_new_tokens,
                                          str(self.examples[index]["id"]))
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
        del self.running[seq]
        if self.progress is not None:
            self.progress(1)
