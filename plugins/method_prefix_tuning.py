"""Prefix tuning (Li & Liang, 2021): trained key/value vectors, "virtual tokens", prepended in every
attention layer, through peft. The base model is untouched, so there is no weight update to merge.

Batched evaluation pads prompts on the left; peft prepends the prefix's attention mask to the
batch's own, so padded and unpadded prompts generate the same tokens (tests/test_methods.py checks).
"""

from __future__ import annotations

from pydantic import Field

from peftbench.components import Capabilities, MethodPlugin, Options
from peftbench.errors import StageRefused
from peftbench.hookspecs import hookimpl


class PrefixTuningOptions(Options):
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length: virtual key/value tokens per layer")
    prefix_projection: bool = Field(
        False, description="reparameterise the prefix through a two-layer MLP (the paper's trick for stabler training; "
                           "many more trainable parameters)"
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="hidden size of that MLP; default: the model's hidden size (prefix_projection only)"
    )


class PrefixTuning(MethodPlugin):
    """Prefix tuning on the full-precision base model."""

    name = "prefix_tuning"
    Options = PrefixTuningOptions
    capabilities = Capabilities(
        mergeable=False, gguf_exportable=False,
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
        return get_peft_model(model, config)

    def merge(self, model, ctx):
        raise StageRefused(
            "method 'prefix_tuning' cannot be merged: its prefix is extra key/value vectors fed to every attention "
            "layer at run time, not a change to any weight, so there is nothing to fold into the base model.",
            "export the adapter (exporter 'adapter') and load it with PeftModel.from_pretrained, "
            "or train a mergeable method such as lora for a merged model or GGUF.",
        )


@hookimpl
def peftbench_register_methods(register):
    register(PrefixTuning)
