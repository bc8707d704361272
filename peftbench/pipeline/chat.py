"""Prompts through the model's chat template, and assistant-only loss masking.

A training example is ``prompt tokens`` (the chat template up to and including the assistant
header) followed by ``summary tokens + end-of-turn token``. Labels are -100 on the prompt, so the
loss covers exactly the summary and the end-of-turn token. Building the two parts separately (not
by searching for the summary inside a rendered conversation) makes the mask exact by construction.
"""

from __future__ import annotations

from functools import lru_cache

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
_SENTINEL = "\u2063PEFTBENCH_SENTINEL\u2063"


def build_messages(prompt, dialogue: str) -> list[dict]:
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.template.replace("{dialogue}", dialogue)})
    return messages


def render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=16)
def _end_of_turn_cached(tokenizer) -> tuple[int, str]:
    rendered = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], False)
    after = rendered.split(_SENTINEL, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder):
        return ids[0], tokenizer.convert_ids_to_tokens(ids[0])
    return tokenizer.eos_token_id, tokenizer.eos_token


def end_of_turn(tokenizer) -> tuple[int, str]:
    """(id, text) of the token that closes an assistant turn (<|im_end|>, <|eot_id|>, ...)."""
    return _end_of_turn_cached(tokenizer)


def stop_token_ids(tokenizer) -> list[int]:
    ids = [end_of_turn(tokenizer)[0]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt, dialogue: str) -> list[int]:
    """Token ids of the prompt (ending with the assistant header), the dialogue cut to fit."""
    ids = _prompt_ids(tokenizer, prompt, dialogue)
    excess = len(ids) - prompt.max_source_tokens
    if excess > 0:
        dialogue_ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
        keep = max(len(dialogue_ids) - excess, 0)
        ids = _prompt_ids(tokenizer, prompt, tokenizer.decode(dialogue_ids[:keep]))
        ids = ids[: prompt.max_source_tokens]  # re-tokenising can differ by a token or two
    return ids


def _prompt_ids(tokenizer, prompt, dialogue: str) -> list[int]:
    text = render_chat(tokenizer, build_messages(prompt, dialogue), add_generation_prompt=True)
    # The rendered template already holds BOS and other special tokens as text.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, prompt, dialogue: str, summary: str) -> dict:
    prompt_ids = encode_prompt(tokenizer, prompt, dialogue)
    target_ids = tokenizer(summary.strip(), add_special_tokens=False)["input_ids"][: prompt.max_target_tokens]
    target_ids = target_ids + [end_of_turn(tokenizer)[0]]
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def tokenize_for_training(dataset, tokenizer, prompt):
    """A datasets.Dataset of input_ids/attention_mask/labels, ready for DataCollatorForSeq2Seq."""
    return dataset.map(
        lambda ex: encode_example(tokenizer, prompt, ex["dialogue"], ex["summary"]),
        remove_columns=dataset.column_names,
        desc="tokenising",
    )
