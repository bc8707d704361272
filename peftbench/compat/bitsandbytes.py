"""Keeps 4-bit (bitsandbytes) models trainable on CPUs with AVX-512 BF16 after an evaluation.

Why: bitsandbytes 0.50.x (``nn/modules.py``, ``Linear4bit.forward``) converts a 4-bit weight to a
CPU-packed layout the first time the layer runs in eval mode on an input that needs no gradient
(``_convert_weight_packed_for_cpu``, ``quant_state.packing_format_for_cpu``) on CPUs with AVX-512
BF16, and never converts it back. Every later forward of that layer, training ones included, runs
``gemv_4bit``, which has no autograd kernel: gradients through the layer are silently zero, so a
QLoRA run whose baseline evaluation came first trained nothing (loss flat, grad_norm 0).

The packed layout is what makes CPU generation fast, so evaluation keeps it. A forward pre-hook on
each ``Linear4bit`` puts the exact original weight and quantisation state back before any forward
that trains (module in training mode, or an input that needs a gradient). bitsandbytes' own inverse
(``_convert_weight_packed_for_cpu_inverse``) is "best-effort": it re-quantises the absmax scales from a
bf16 copy, so every evaluation would move the frozen base a little. We keep the originals instead
(the packing makes new tensors, so this costs one reference, not a copy) and use the inverse only for
a weight that was packed before the hook was installed.
"""

from __future__ import annotations

import copy

_ORIGINAL = "_peftbench_unpacked_weight"  # (weight data, quant state) as they were before packing
_HOOKED = "_peftbench_pack_guard"


def _is_packed(module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def unpack_for_training(module) -> bool:
    """Put a packed ``Linear4bit`` weight back into the layout training uses; True if it was packed."""
    if not _is_packed(module):
        return False
    saved = getattr(module, _ORIGINAL, None)
    if saved is not None:
        module.weight.data, module.weight.quant_state = saved
    else:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state)
    module.quant_state = module.weight.quant_state
    setattr(module, _ORIGINAL, None)
    return True


def _guard(module, args, kwargs):
    x = args[0] if args else next(iter(kwargs.values()), None)
    trains = module.training or bool(getattr(x, "requires_grad", False))
    if trains:
        unpack_for_training(module)
    elif not _is_packed(module) and getattr(module.weight, "quant_state", None) is not None:
        # This forward may pack the weight (bitsandbytes decides): remember the original first.
        setattr(module, _ORIGINAL, (module.weight.data, copy.copy(module.weight.quant_state)))


def guard_4bit_layers(model) -> int:
    """Install the guard on every bitsandbytes ``Linear4bit`` of ``model`` whose weight is on the CPU
    (idempotent); returns how many layers it guards. A model without 4-bit layers is left alone.

    Only CPU layers: bitsandbytes packs nothing on a GPU, and there the hook is worse than useless.
    Traced by torch.compile (trainer.compile: true, torch 2.11), the hook's reads of the weight sent
    bitsandbytes 0.50.2's ``Params4bit.__torch_function__`` into endless recursion (a RecursionError at
    the first QLoRA step on a GPU)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.weight.device.type == "cpu":
            if not getattr(module, _HOOKED, False):
                module.register_forward_pre_hook(_guard, with_kwargs=True)
                setattr(module, _HOOKED, True)
            count += 1
    return count


def unpack_all(model) -> int:
    """Unpack every packed 4-bit layer now (before saving, merging or a training loop that bypasses
    forward hooks); returns how many were packed."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    return sum(unpack_for_training(m) for m in model.modules() if isinstance(m, Linear4bit))
