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
    upcast_fp32: bool | Literal["auto"] = Field(
        "auto", description="cast the base's weights that stay unquantised (embeddings, norms, LM head) to fp32, as "
        "peft's prepare_model_for_kbit_training does, which makes the residual stream fp32; auto: only with float16 "
        "compute, whose range needs it. bfloat16 keeps them in bfloat16, like lora: thousands fewer casts a step")


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
        # What peft's prepare_model_for_kbit_training(use_gradient_checkpointing=False) does, minus the fp32 cast
        # where bf16 suffices: freeze the base, and (for float16 compute, or when asked) cast the unquantised weights
        # to fp32. Checkpointing is the trainer's decision (non-reentrant, so inputs need no gradient).
        # Why not always fp32: an fp32 residual stream around bf16 matmuls costs a cast kernel at every layer
        # boundary, doubles the activations kept for backward and keeps an fp32 copy of the embedding besides the
        # bf16 one autocast makes of it each step; LoRA on a bf16 base trains with a bf16 residual stream
        # (measurements: benchmarks/results/2026-12-05/README.md).
        import torch

        for param in model.parameters():
            param.requires_grad = False
        if upcast_fp32(options.upcast_fp32, model):
            for param in model.parameters():
                if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
                    param.data = param.data.to(torch.float32)
        return super().apply(model, options, ctx)

    def merge(self, model, options, ctx):
        """Fold the trained adapter into a 16-bit base: merging into 4-bit weights would round the
        update away. The adapter must be saved first (the runner saves it before exporting)."""
        from peft import PeftModel

        base = base_for_merge(ctx, options.merge_into)
        return PeftModel.from_pretrained(base, str(ctx.adapter_dir)).merge_and_unload()


def upcast_fp32(asked: bool | str, model) -> bool:
    """Whether ``upcast_fp32`` casts: as asked, or for ``auto`` when the unquantised weights are float16."""
    import torch

    if asked != "auto":
        return bool(asked)
    return any(p.dtype == torch.float16 for p in model.parameters() if p.__class__.__name__ != "Params4bit")


@hookimpl
def peftbench_register_methods(register):
    register(Qlora)
