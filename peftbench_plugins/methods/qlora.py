"""QLoRA (Dettmers et al., 2023): LoRA on a base model frozen in 4-bit NF4 (bitsandbytes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftbench.api import Capabilities, hookimpl
from peftbench.kit import MERGE_TARGET_HELP, MergeTarget, base_for_merge, four_bit_config
from peftbench_plugins.methods.lora import Lora, LoraOptions


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights")
    double_quant: bool = Field(True, description="quantise the quantisation constants too (saves ~0.4 bit/param)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the 4-bit matmuls; substituted with fp32 on the CPU"
    )
    # Default: the NF4 round trip, the weights the adapter was trained against, so the merged model (and
    # its GGUF) answers like the trained one; the adapter learnt to correct the NF4 error, and folding it
    # into the original weights corrects an error that is no longer there (README, "merge_into", has the
    # measurements). merge_into=original remains for a base without NF4 error.
    merge_into: MergeTarget = Field("nf4_roundtrip", description=MERGE_TARGET_HELP)


class Qlora(Lora):
    """LoRA on a 4-bit NF4 base; merging folds the adapter into a 16-bit copy of the base."""

    name = "qlora"
    Options = QloraOptions
    capabilities = Capabilities(
        mergeable=True, needs_quantized_base=True,
        notes="needs bitsandbytes; merged into 16-bit base weights, not the 4-bit ones",
    )

    def quantization_config(self, options: QloraOptions, policy):
        return four_bit_config(policy, method=self.name, quant_type=options.quant_type,
                               double_quant=options.double_quant, compute_dtype=options.compute_dtype)

    def apply(self, model, options: QloraOptions, ctx):
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input gradients; checkpointing is the trainer's decision.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, options, ctx)

    def merge(self, model, options, ctx):
        """Fold the trained adapter into a 16-bit base: merging into 4-bit weights would round the
        update away. The adapter must be saved first (the runner saves it before exporting)."""
        from peft import PeftModel

        base = base_for_merge(ctx, options.merge_into)
        return PeftModel.from_pretrained(base, str(ctx.adapter_dir)).merge_and_unload()


@hookimpl
def peftbench_register_methods(register):
    register(Qlora)
