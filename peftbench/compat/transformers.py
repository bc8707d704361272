"""Workarounds for transformers (5.17 to 5.23, the range peftbench supports)."""

from __future__ import annotations

from pathlib import Path


def complete_special_tokens(tokenizer) -> None:
    """An end-of-sequence token that ends a turn, and a pad token.

    transformers 5.17 builds the tokenizer of a SmolLM2 GGUF with eos = ``<|im_start|>`` (the token
    that *opens* every turn) and no pad token; 5.23 gives ``<|im_end|>`` for both. A pad token copied
    from such an eos is a token every prompt contains: a model config that takes it as
    ``pad_token_id`` zeroes that embedding row (a random-weight benchmark model's bf16 training went
    NaN at its first step). So an eos that occurs inside the rendered prompt is replaced by the
    template's end-of-turn token, and a missing pad token becomes that eos, as transformers 5.23 does."""
    from peftbench.pipeline.chat import end_of_turn, render_chat

    if tokenizer.chat_template and tokenizer.eos_token_id is not None:
        eot_id, eot_text = end_of_turn(tokenizer)
        prompt = render_chat(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
        if eot_id != tokenizer.eos_token_id and tokenizer.eos_token_id in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            tokenizer.eos_token = eot_text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def dequantized_4bit_model(model):
    """``model.dequantize()`` of a bitsandbytes 4-bit model, usable by peft's merges.

    transformers 5.17-5.23 ``dequantize()`` clears ``is_quantized`` but leaves ``is_loaded_in_4bit``
    set, and peft 0.21's IA3 merge refuses any model carrying that flag ("Cannot merge ia3 layers when
    the model is loaded in 4-bit mode") although no 4-bit layer is left."""
    model = model.dequantize()
    model.is_loaded_in_4bit = False
    return model


def load_finished_checkpoint(trainer, checkpoint: str | Path) -> None:
    """Take a checkpoint of a finished schedule as the trained state, without training.

    transformers 5.17-5.23 resumed (``train(resume_from_checkpoint=...)``) from the last checkpoint of
    a finished schedule runs one optimiser step more than asked. The Trainer has no public call that
    only loads a checkpoint, so this uses its private ``_load_from_checkpoint`` (the weights in the
    Trainer's own format for this model) and reads the state it saved."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def clip_trainable_grad_norm(trainer, model, stock_clip):
    """``Trainer._clip_grad_norm`` over the trainable parameters only, listed once.

    transformers 5.17-5.23 hand accelerate ``model.parameters()``, which accelerate turns into a list:
    a walk over every module and frozen weight each optimiser step (a visible share of a small model's
    step time). Frozen weights have no gradient and ``clip_grad_norm_`` skips them, so the trainable
    ones give the same norm and the same clipping. Sharded (FSDP, DeepSpeed) and mixed-mesh setups keep
    the stock path, ``stock_clip(model)``. Call it from a Trainer subclass's ``_clip_grad_norm``."""
    if getattr(trainer, "_peftbench_clipped", None) is None:  # decided once: sharding and trainability stay as set up
        mixed_mesh = getattr(trainer, "_has_mixed_mesh_grads", lambda _: False)(model)
        stock = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or mixed_mesh
        trainer._peftbench_clipped = () if stock else [p for p in model.parameters() if p.requires_grad]
    if not trainer._peftbench_clipped:
        return stock_clip(model)
    return trainer.accelerator.clip_grad_norm_(trainer._peftbench_clipped, trainer.args.max_grad_norm)
