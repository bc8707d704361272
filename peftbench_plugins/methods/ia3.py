"""(IA)³ (Liu et al., 2022): learned vectors that rescale keys, values and the feed-forward
activations, through peft. Initialised to ones, so training starts from the base model exactly.

The scaling folds into the weights only when they are full precision (a 4-bit weight cannot absorb
it without rounding it away), so merging loads the base again in 16 bits and applies the saved adapter
to that; after training on a 4-bit base, ``merge_into`` says which 16-bit weights (as for QLoRA).
"""

from __future__ import annotations

from pydantic import Field

from peftbench.api import Capabilities, MethodPlugin, Options, PeftbenchError, hookimpl
from peftbench.kit import (ARCHITECTURES, MERGE_TARGET_HELP, MergeTarget, base_for_merge, four_bit_config, resolve_targets,
                           targets_for, wrap_with_peft)


class Ia3Options(Options):
    target_modules: list[str] | None = Field(
        None, description="modules whose output (or, for feedforward ones, input) is rescaled; "
                          "default: the architecture's key, value and MLP down projections"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="which of target_modules are feed-forward layers (scaled on their input); "
                          "default: the architecture's MLP down projection, if targeted"
    )
    load_in_4bit: bool = Field(
        False, description="load the frozen base in 4-bit NF4 (bitsandbytes) to save memory; "
                           "merging folds the adapter into 16-bit weights (merge_into)"
    )
    merge_into: MergeTarget = Field("nf4_roundtrip", description=MERGE_TARGET_HELP + "; with load_in_4bit only (default as for qlora)")


class Ia3(MethodPlugin):
    """(IA)³ on a full-precision (or, optionally, 4-bit) base."""

    name = "ia3"
    Options = Ia3Options
    capabilities = Capabilities(
        mergeable=True,
        notes="merged into full-precision base weights (reloaded if training used a 4-bit base)",
    )

    def quantization_config(self, options: Ia3Options, policy):
        if not options.load_in_4bit:
            return None
        return four_bit_config(policy, method=self.name)  # the NF4 settings qlora defaults to

    def peft_config(self, options: Ia3Options, model_config):
        from peft import IA3Config, TaskType

        if options.target_modules is None:
            arch = targets_for(model_config)  # unknown architecture: asks for target_modules
            targets = [*arch.key_value, *arch.feedforward]
        else:
            targets = resolve_targets(model_config, options.target_modules)
        known = ARCHITECTURES.get(getattr(model_config, "model_type", None))
        if options.feedforward_modules is not None:
            feedforward = list(options.feedforward_modules)
        else:
            feedforward = [m for m in (known.feedforward if known else ()) if m in targets]
        if not set(feedforward) <= set(targets):
            raise PeftbenchError(
                f"ia3: feedforward_modules {sorted(set(feedforward) - set(targets))} are not in target_modules {targets}.",
                "list every feed-forward module in method.target_modules too.",
            )
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=targets,
            feedforward_modules=feedforward,
            fan_in_fan_out=bool(known and known.fan_in_fan_out),
        )

    def apply(self, model, options: Ia3Options, ctx):
        from peft import prepare_model_for_kbit_training

        if options.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return wrap_with_peft(model, self.peft_config(options, model.config))

    def merge(self, model, options, ctx):
        """Fold the saved adapter into a fresh 16-bit base (after a 4-bit base: the one merge_into names).
        The adapter must be saved first
        (the runner saves it before exporting); the trained model itself is left as it is."""
        base = base_for_merge(ctx, options.merge_into) if options.load_in_4bit else ctx.load_base_model(quantized=False)
        return self.load(base, ctx.adapter_dir, options).merge_and_unload()


@hookimpl
def peftbench_register_methods(register):
    register(Ia3)
