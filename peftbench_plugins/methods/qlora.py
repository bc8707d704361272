"""QLoRA (Dettmers et al., 2023): LoRA on a base model frozen in 4-bit NF4 (bitsandbytes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftbench.api import MERGE_TARGET_HELP, Capabilities, MergeTarget, base_for_merge
from peftbench.pipeline.modeling import four_bit_config
from peftbench.api import hookimpl
from peftbench_plugins.methods.lora import Lora, LoraOptions


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights")
    double_quant: bool = Field(True, description="quantise the quantisation constants too (saves ~0.4 bit/param)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the 4-bit matmuls; substituted with fp32 on the CPU"
    )
    # Default: the NF4 round trip, the weights the adapter was trained against. Measured on SmolLM2-135M,
    # a full SAMSum epoch of QLoRA (lr 2e-3, all linear layers, trained on an H200), exported on a 2-core
    # AMD CPU and smoke-tested on 100 validation dialogues against the HF model's 46.93 ROUGE-1
    # (2026-12-04): from the round trip Q4_K_M 46.03 (-0.90), Q5_K_M 46.37, Q8_0 45.82, agreement with
    # the HF answers 79-88; from the original weights Q4_K_M 43.34 (-3.59), Q5_K_M 44.33, Q8_0 43.06,
    # agreement 60-62. HF fp32 on the lesson's run (lr 2e-4, q/v, 100 held-out train dialogues):
    # unmerged 40.15, round trip 39.61 (48 of 100 answers identical), original 38.62 (2 identical).
    # Only the 17-step quickstart favoured the original weights (same AMD CPU, 60 chatsum test dialogues,
    # HF 51.99: Q4_K_M 50.15 vs 47.95), where the adapter has learnt little to correct.
    # merge_into=original remains for a base without NF4 error.
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
        mergeable=True, gguf_exportable=True, needs_quantized_base=True,
        notes="needs bitsandbytes; merged into 16-bit base weights, not the 4-bit ones",
    )

    def quantization_config(self, options: QloraOptions, policy):
        return four_bit_config(policy, method=self.name, quant_type=options.quant_type,
                               double_quant=options.double_quant, compute_dtype=options.compute_dtype)

    def apply(self, model, options: QloraOptions, ctx):
        # What peft's prepare_model_for_kbit_training(use_gradient_checkpointing=False) does, minus the fp32 cast
        # where bf16 suffices: freeze the base, and (for float16 compute, or when asked) cast the unquantised weights
        # to fp32. Checkpointing is the trainer's decision (non-reentrant, so inputs need no gradient).
        # Why not always fp32: on an H100/H200 (the Llama-3.2-1B shape, 2026-12-04) the fp32 residual stream around
        # bf16 matmuls made QLoRA's step thousands of cast kernels (copies were the largest kernel group), doubled
        # the activations it keeps, and kept an fp32 copy of the 128k-token embedding (1 GiB) besides the bf16
        # one autocast makes of it at every step; LoRA on a bf16 base trains with the same bf16 residual stream.
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
