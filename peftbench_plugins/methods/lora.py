"""LoRA (Hu et al., 2021): low-rank updates W + (alpha/r)·B·A on chosen linear layers, through peft."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftbench.api import Capabilities, MethodPlugin, Options, hookimpl
from peftbench.kit import resolve_targets, targets_for, wrap_with_peft


class LoraOptions(Options):
    r: int = Field(8, gt=0, description="rank of the update; higher adapts more and costs more memory")
    alpha: float = Field(16, gt=0, description="scaling numerator: the update is multiplied by alpha/r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt; default: the architecture's query/value projections"
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases also train")
    use_rslora: bool = Field(False, description="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")


class Lora(MethodPlugin):
    """LoRA on the full-precision base model."""

    name = "lora"
    Options = LoraOptions
    capabilities = Capabilities(mergeable=True, notes="merges exactly into the base weights")

    def peft_config(self, options: LoraOptions, model):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=resolve_targets(model.config, options.target_modules),
            bias=options.bias,
            use_rslora=options.use_rslora,
            use_dora=options.use_dora,
            fan_in_fan_out=targets_for(model.config).fan_in_fan_out if options.target_modules is None else False,
        )

    def apply(self, model, options: LoraOptions, ctx):
        return wrap_with_peft(model, self.peft_config(options, model))

    def merge(self, model, options, ctx):
        return model.merge_and_unload()


@hookimpl
def peftbench_register_methods(register):
    register(Lora)
