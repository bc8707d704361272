"""Assistant-only loss masking: the only tokens that carry a label are the summary and the end-of-turn token."""

from peftbench.pipeline.chat import IGNORE_INDEX, encode_example, encode_prompt, end_of_turn
from peftbench.pipeline.recipe import PromptSection

DIALOGUE = "Anna: are we still on for 7?\nTom: yes, at the Italian place\nAnna: great, c u there"
SUMMARY = "Anna and Tom will meet at the Italian place at 7."


def _tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_unmasked_labels_decode_to_exactly_the_summary_and_end_of_turn(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    example = encode_example(tok, PromptSection(), DIALOGUE, SUMMARY)
    kept = [t for t in example["labels"] if t != IGNORE_INDEX]
    eot_id, eot_text = end_of_turn(tok)
    assert kept[-1] == eot_id
    assert eot_text == "<|im_end|>"
    assert tok.decode(kept[:-1]) == SUMMARY
    # Labels line up with input_ids (the model shifts them itself).
    n_prompt = example["labels"].index(kept[0])
    assert example["input_ids"][n_prompt:] == kept
    assert all(t == IGNORE_INDEX for t in example["labels"][:n_prompt])


def test_prompt_is_the_chat_template_with_generation_prompt(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    prompt = PromptSection(system="You summarise chats.")
    ids = encode_prompt(tok, prompt, DIALOGUE)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou summarise chats.<|im_end|>")
    assert DIALOGUE in text
    assert text.endswith("<|im_start|>assistant\n")
    # The summary never appears in the prompt.
    assert SUMMARY not in text


def test_long_dialogue_is_truncated_to_the_source_budget(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    long_dialogue = "\n".join(f"Person{i}: message number {i} about the plans" for i in range(200))
    prompt = PromptSection(max_source_tokens=120, max_target_tokens=8)
    ids = encode_prompt(tok, prompt, long_dialogue)
    assert len(ids) <= 120
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    example = encode_example(tok, prompt, long_dialogue, SUMMARY)
    assert len([t for t in example["labels"] if t != IGNORE_INDEX]) == 8 + 1  # summary cut to 8, plus end-of-turn


def test_an_eos_that_opens_every_turn_is_replaced_and_pad_is_set(tiny_model_dir):
    """transformers 5.17 builds SmolLM2's GGUF tokenizer with eos <|im_start|> and no pad token (issue 13):
    peftbench makes eos the template's end-of-turn token and pads with it, as transformers 5.23 does."""
    from peftbench.compat.transformers import complete_special_tokens
    from peftbench.pipeline.chat import end_of_turn, stop_token_ids

    tok = _tokenizer(tiny_model_dir)
    tok.eos_token = "<|im_start|>"
    tok.pad_token = None
    complete_special_tokens(tok)
    assert tok.eos_token == "<|im_end|>" == tok.pad_token == end_of_turn(tok)[1]
    assert "<|im_start|>" not in tok.convert_ids_to_tokens(stop_token_ids(tok))

    untouched = _tokenizer(tiny_model_dir)
    untouched.pad_token = "<|endoftext|>"
    complete_special_tokens(untouched)
    assert (untouched.eos_token, untouched.pad_token) == ("<|im_end|>", "<|endoftext|>"), "a sound tokenizer is left as it is"
