"""Prefix tuning (Li & Liang, 2021): trained key/value vectors, "virtual tokens", prepended in every
attention layer, through peft. The base model is untouched, so there is no weight update to merge.

peft initialises the prefix at random, and random keys and values in every layer turn a chat
model's output into noise before training starts (SmolLM2-135M-Instruct writes word salad), which a
short run does not recover from. Li & Liang found prefixes initialised with the activations of real
words train better, so by default the prefix starts as the base model's own keys and values for a
short instruction (``init_text``): at step 0 the model behaves exactly as if that text preceded the
prompt (tests/test_methods.py checks), and training moves on from there.

Batched evaluation pads prompts on the left; peft prepends the prefix's attention mask to the
batch's own, so padded and unpadded prompts generate the same tokens (tests/test_methods.py checks).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from peftbench.api import Capabilities, MethodPlugin, Options, PeftbenchError, StageRefused, hookimpl


class PrefixTuningOptions(Options):
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length: virtual key/value tokens per layer")
    init_text: str | None = Field(
        "Summarize the dialogue in one or two sentences.",
        description="start the prefix as the base model's keys/values for this text (repeated or cut to "
                    "num_virtual_tokens tokens); null: peft's random initialisation",
    )
    prefix_projection: bool = Field(
        False, description="reparameterise the prefix through a two-layer MLP (the paper's trick for stabler training; "
                           "many more trainable parameters; random initialisation only)"
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="hidden size of that MLP; default: the model's hidden size (prefix_projection only)"
    )

    @model_validator(mode="after")
    def _init_text_needs_a_plain_prefix(self):
        if self.prefix_projection and self.init_text:
            raise ValueError("init_text sets the prefix's keys/values directly, which prefix_projection replaces by an MLP: "
                             "set init_text to null or prefix_projection to false")
        return self


class PrefixTuning(MethodPlugin):
    """Prefix tuning on the full-precision base model."""

    name = "prefix_tuning"
    Options = PrefixTuningOptions
    capabilities = Capabilities(
        mergeable=False,
        notes="virtual tokens, not a weight update: cannot be merged or exported as GGUF; export the adapter",
    )

    def apply(self, model, options: PrefixTuningOptions, ctx):
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.prefix_projection,
            encoder_hidden_size=options.encoder_hidden_size or model.config.hidden_size,
        )
        peft_model = get_peft_model(model, config)
        if options.init_text:
            tokenizer = ctx.tokenizer
            if tokenizer is None:
                from peftbench.kit import load_tokenizer

                tokenizer = load_tokenizer(ctx.model_source, ctx.recipe.recipe.model.trust_remote_code)
            init_prefix_from_text(peft_model, tokenizer, options.init_text)
        return peft_model

    def merge(self, model, options, ctx):
        raise StageRefused(
            "method 'prefix_tuning' cannot be merged: its prefix is extra key/value vectors fed to every attention "
            "layer at run time, not a change to any weight, so there is nothing to fold into the base model.",
            "export the adapter (exporter 'adapter') and load it with PeftModel.from_pretrained, "
            "or train a mergeable method such as lora for a merged model or GGUF.",
        )


def prefix_token_ids(tokenizer, text: str, length: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftbenchError("prefix_tuning: init_text has no tokens.", "give a non-empty method.init_text, or null.")
    return (ids * (length // len(ids) + 1))[:length]


def init_prefix_from_text(peft_model, tokenizer, text: str) -> list[int]:
    """Set the prefix to the base model's keys and values for ``text``; returns the token ids used.

    peft reads the prefix embedding of each virtual token as [layer][key, value][kv-head][head_dim]
    (``PeftModel.get_prompt``), which is how the base model's cache is laid out per token."""
    import torch

    config = peft_model.peft_config[peft_model.active_adapter]
    ids = prefix_token_ids(tokenizer, text, config.num_virtual_tokens)
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    base.train(was_training)
    per_layer = []
    for layer in cache.layers[: config.num_layers]:
        per_layer += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # (tokens, heads, head_dim)
    prefix = torch.stack(per_layer, dim=1).reshape(config.num_virtual_tokens, -1)
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    if prefix.shape != embedding.shape:
        raise PeftbenchError(
            f"prefix_tuning cannot initialise from text for '{base.config.model_type}': its cache holds "
            f"{tuple(prefix.shape)} values per prefix, peft expects {tuple(embedding.shape)}.",
            "set method.init_text to null (random initialisation).",
        )
    with torch.no_grad():
        embedding.copy_(prefix.to(embedding.dtype))
    return ids


@hookimpl
def peftbench_register_methods(register):
    register(PrefixTuning)
