"""Which modules a method adapts, per architecture (``config.model_type``).

Wrong target names are the classic silent failure of PEFT (peft then raises, or adapts nothing
useful), so defaults live here, in one table, and unknown architectures get a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.errors import PeftbenchError


@dataclass(frozen=True)
class ArchitectureTargets:
    attention: tuple[str, ...]  # the LoRA paper's default: query and value projections
    all_linear: tuple[str, ...]  # every projection in attention and MLP
    key_value: tuple[str, ...]  # IA3 rescales keys and values (the IA3 paper's l_k, l_v)
    feedforward: tuple[str, ...]  # IA3 scales these on their input (the MLP's down projection)
    bias_flags: tuple[str, ...] = ()  # config flags that give the projections bias terms (BitFit)
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed


_LLAMA_LIKE = ArchitectureTargets(
    attention=("q_proj", "v_proj"),
    all_linear=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    key_value=("k_proj", "v_proj"),
    feedforward=("down_proj",),
)

ARCHITECTURES: dict[str, ArchitectureTargets] = {
    "llama": ArchitectureTargets(**{**_LLAMA_LIKE.__dict__, "bias_flags": ("attention_bias", "mlp_bias")}),
    "mistral": _LLAMA_LIKE,  # no biases, and transformers' Mistral has no flag to add them
    "qwen2": _LLAMA_LIKE,  # q/k/v already carry biases in Qwen2
    "qwen3": ArchitectureTargets(**{**_LLAMA_LIKE.__dict__, "bias_flags": ("attention_bias",)}),
    "gemma": ArchitectureTargets(**{**_LLAMA_LIKE.__dict__, "bias_flags": ("attention_bias",)}),
    "gemma2": ArchitectureTargets(**{**_LLAMA_LIKE.__dict__, "bias_flags": ("attention_bias",)}),
    "gemma3_text": ArchitectureTargets(**{**_LLAMA_LIKE.__dict__, "bias_flags": ("attention_bias",)}),
    # c_attn is the fused q/k/v projection; "mlp.c_proj" keeps the attention's c_proj out of IA3's feedforward.
    "gpt2": ArchitectureTargets(attention=("c_attn",), all_linear=("c_attn", "c_proj", "c_fc"), key_value=("c_attn",),
                                feedforward=("mlp.c_proj",), fan_in_fan_out=True),
}


def targets_for(model_config) -> ArchitectureTargets:
    model_type = getattr(model_config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise PeftbenchError(
            f"peftbench has no default target modules for architecture '{model_type}'.",
            f"set method.target_modules to the names of its linear layers (known: {', '.join(sorted(ARCHITECTURES))}).",
        ) from None


def resolve_targets(model_config, requested: list[str] | str | None, kind: str = "attention") -> list[str]:
    """``requested`` as given, or the architecture's default of ``kind`` (attention/all_linear/...)."""
    if requested is None:
        return list(getattr(targets_for(model_config), kind))
    if isinstance(requested, str):
        return [requested] if requested != "all-linear" else list(targets_for(model_config).all_linear)
    return list(requested)


def module_matches(module_name: str, target: str) -> bool:
    """Whether ``target`` names this module the way peft's target_modules list does (a dotted suffix)."""
    return module_name == target or module_name.endswith("." + target)


def wrap_with_peft(model, peft_config):
    """``peft.get_peft_model``, with peft's "Target modules ... not found in the base model" as one
    line that says where the names go (peft raises a ValueError only once the model is built)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise PeftbenchError(f"{str(e).splitlines()[0].split('. Please')[0]} ({type(model).__name__}).",
                             "set method.target_modules to names of the model's linear layers "
                             "(for Llama-like models: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).") from None
