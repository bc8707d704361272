"""The forgetting probe (peftbench.pipeline.forgetting): loss on general text, per text, before and after."""

from __future__ import annotations

import math

import pytest

from peftbench.errors import PeftbenchError
from peftbench.pipeline.forgetting import BUILTIN_TEXTS, load_texts, text_loss


def test_the_builtin_texts_ship_with_their_licence():
    texts = load_texts()
    assert len(texts) == 40 and all(len(t.split()) > 40 for t in texts)
    assert "CC BY 4.0" in (BUILTIN_TEXTS.parent / "LICENSE").read_text(encoding="utf-8")


def test_a_texts_file_is_read_and_a_bad_one_named(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert load_texts(good) == ["one", "two"] and load_texts(good, limit=1) == ["one"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(PeftbenchError, match="line 2 of .* has no \"text\""):
        load_texts(bad)
    with pytest.raises(PeftbenchError, match="do not exist"):
        load_texts(tmp_path / "missing.jsonl")


def test_loss_falls_on_texts_the_model_was_trained_on_and_training_mode_is_kept(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    texts = load_texts(limit=3)
    model.train()
    before = text_loss(model, tokenizer, texts)
    assert model.training, "the probe must restore the training mode it found"
    assert len(before.per_text) == 3 and before.tokens > 100 and math.isfinite(before.loss)
    assert before.perplexity == pytest.approx(math.exp(before.loss))

    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([tokenizer(texts[0], add_special_tokens=False)["input_ids"]])
    for _ in range(20):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
    after = text_loss(model, tokenizer, texts)
    assert after.per_text[0] < before.per_text[0] - 0.5


@pytest.mark.parametrize("peft_type", ["prefix", "prompt"])
def test_prompt_learning_models_are_scored_on_the_texts_own_tokens(tiny_model_dir, peft_type):
    """A peft prompt-learning model: prefix tuning adds past key/values, prompt tuning prepends virtual
    tokens to the logits; either way each text is scored on its own tokens, and an untrained prefix or
    prompt changes the loss (it is part of the model)."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    texts = load_texts(limit=2)
    plain = text_loss(base, tokenizer, texts)
    config = (PrefixTuningConfig if peft_type == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = get_peft_model(base, config)
    tuned = text_loss(model, tokenizer, texts)
    assert tuned.tokens == plain.tokens and len(tuned.per_text) == 2
    assert all(math.isfinite(x) for x in tuned.per_text) and tuned.per_text != plain.per_text


def test_paired_change_is_the_standard_error_of_the_per_text_differences():
    from peftbench.pipeline.forgetting import paired_change

    assert paired_change([1.0, 2.0, 3.0], [1.5, 2.0, 3.5]) == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert paired_change([1.0], [2.0]) is None and paired_change([1.0, 2.0], [1.0]) is None


def test_a_llama_cpp_failure_in_the_gguf_probe_is_a_note(monkeypatch):
    from types import SimpleNamespace

    from peftbench_plugins.gguf import forgetting

    def crashes(gguf, texts):
        raise RuntimeError("llama.cpp crashed")

    monkeypatch.setattr(forgetting, "gguf_text_loss", crashes)
    evaluation = SimpleNamespace(forgetting=True, forgetting_texts=None)
    ctx = SimpleNamespace(recipe=SimpleNamespace(recipe=SimpleNamespace(evaluation=evaluation)))
    assert forgetting.forgetting_in_run("model.gguf", ctx) == {"forgetting_note": "not scored (RuntimeError: llama.cpp crashed)"}
    evaluation.forgetting = False
    assert forgetting.forgetting_in_run("model.gguf", ctx) == {}
