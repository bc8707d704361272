"""LayerNorm tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"): train only the
normalisation layers' scales (and shifts, where they have them), through peft's LNTuningConfig.

A few thousand parameters for a 100M-parameter model. peft trains a copy of each targeted norm
layer; merging swaps the trained copy in, so the merged model is a standard checkpoint.
"""

from __future__ import annotations

from pydantic import Field

from peftbench.api import Capabilities, MethodPlugin, Options, PeftbenchError, hookimpl


class LnTuningOptions(Options):
    target_modules: list[str] | None = Field(
        None, description="normalisation layers to train; default: peft's list for the architecture "
                          "(Llama: input_layernorm, post_attention_layernorm, norm)"
    )


class LnTuning(MethodPlugin):
    """Train the normalisation layers of a full-precision base model."""

    name = "ln_tuning"
    Options = LnTuningOptions
    capabilities = Capabilities(mergeable=True, notes="trains only the norm layers' weights")

    def target_modules(self, options: LnTuningOptions, model_config) -> list[str]:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as DEFAULTS

        if options.target_modules is not None:
            return list(options.target_modules)
        model_type = getattr(model_config, "model_type", None)
        if model_type not in DEFAULTS:
            raise PeftbenchError(
                f"ln_tuning has no default norm layers for architecture '{model_type}'.",
                "set method.target_modules to the names of its normalisation layers.",
            )
        return list(DEFAULTS[model_type])

    def apply(self, model, options: LnTuningOptions, ctx):
        from peft import LNTuningConfig, TaskType, get_peft_model

        config = LNTuningConfig(task_type=TaskType.CAUSAL_LM, target_modules=self.target_modules(options, model.config))
        return get_peft_model(model, config)

    def merge(self, model, options, ctx):
        return model.merge_and_unload()


@hookimpl
def peftbench_register_methods(register):
    register(LnTuning)
