"""Fast adapter training without changing what is learned.

An optimiser step still covers the same examples (``batch_size x grad_accum`` of them, in the same
order) and the loss is still the mean over their summary tokens; only the way the step is computed
changes:

- Padding-free packing: the step's examples are concatenated into one row (transformers'
  ``DataCollatorWithFlattening``), position ids restart at every example, and attention stays inside
  each example through a variable-length attention kernel (torch's flash ``varlen_attn``), so no
  FLOP is spent on padding. Without that kernel (the CPU) transformers turns the restarting position
  ids into a block-diagonal mask for SDPA, which is exact too.
- Logits only where there is a label: a causal LM needs the 128k-way softmax only at positions
  whose next token is a summary token (about a tenth of them), so the LM head runs on those rows
  alone (``logits_to_keep`` as a 1-D tensor of positions) and no full-vocabulary fp32 logits exist.
- Token-budget passes: a step's examples run as few forward/backward passes as fit
  ``max_tokens`` tokens each, gradients summed over the passes.
- Gradient checkpointing only when the activations of the largest pass would not fit.
- Compiled decoder layers (``torch.compile``, where triton is): a small model's step is bound by
  launching thousands of tiny kernels (RMSNorm, rotary, SiLU, casts, LoRA's scale-and-add) one by one;
  inductor fuses them. One layer's code is compiled once, with dynamic sequence length, and reused by
  every layer and every packed length (transformers' "regional compilation").
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from peftbench.kit import IGNORE_INDEX, clip_trainable_grad_norm

VARLEN_ATTENTION = "peftbench_varlen"  # the name registered with transformers' AttentionInterface


# --- batches -------------------------------------------------------------------------------------


def split_into_passes(lengths: list[int], max_tokens: int | None = None, max_examples: int | None = None) -> list[list[int]]:
    """Indices of consecutive examples grouped so that each group holds at most ``max_tokens``
    tokens and ``max_examples`` examples (an example longer than the budget gets a group of its
    own). Order is kept."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and ((max_tokens and used + n > max_tokens) or (max_examples and len(current) >= max_examples)):
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def _label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): the sequence positions whose next token carries a label, and those
    labels, shape (rows, positions). A position is kept if any row has a label there."""
    shifted = labels[:, 1:]
    positions = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return positions, shifted[:, positions]


@dataclass
class StepCollator:
    """One optimiser step's examples -> ``{"passes": [...], "num_label_tokens", "num_tokens"}``.

    Each pass is a dict of model inputs plus ``logits_positions``/``targets`` for
    ``label_token_loss``. With ``pack`` the pass is one row without padding (position ids and
    flash-attention sequence boundaries included); without it, rows padded to the pass's longest.
    Everything is computed here on the CPU, so the training step never waits on the GPU to learn
    how many labels there are.
    """

    tokenizer: Any
    pack: bool = True
    max_tokens: int | None = None
    max_examples: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        features = [{k: f[k] for k in ("input_ids", "attention_mask", "labels") if k in f} for f in features]
        lengths = [len(f["input_ids"]) for f in features]
        groups = split_into_passes(lengths, self.max_tokens, self.max_examples)
        passes = [self._collate([features[i] for i in group]) for group in groups]
        return {
            "passes": passes,
            "num_label_tokens": sum(int((p["targets"] != IGNORE_INDEX).sum()) for p in passes),
            "num_tokens": sum(lengths),
        }

    def _collate(self, features: list[dict]) -> dict:
        if self.pack:
            from transformers import DataCollatorWithFlattening

            # separator_id=-100 on each example's first label: the last token of one example never
            # learns to predict the first token of the next.
            batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)(features)
        else:
            from transformers import DataCollatorForSeq2Seq

            # Pads input_ids with the pad token and labels with -100, so padding never counts in the
            # loss (DataCollatorForLanguageModeling would rebuild labels from input_ids and undo the masking).
            batch = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                           pad_to_multiple_of=8)(features)
        positions, targets = _label_targets(batch.pop("labels"))
        batch["logits_positions"] = positions
        batch["targets"] = targets
        return batch


# --- loss ----------------------------------------------------------------------------------------


def label_token_loss(model, inputs: dict, num_label_tokens: int | torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the pass's label tokens, divided by the step's label-token count
    (so the passes of a step add up to the step's mean, as with transformers' own loss). Logits are
    computed only at ``logits_positions`` and upcast to fp32 there alone."""
    inputs = dict(inputs)
    positions = inputs.pop("logits_positions")
    targets = inputs.pop("targets")
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(int(num_label_tokens), 1)


# --- attention -----------------------------------------------------------------------------------


def _varlen_kernel():
    """torch's flash-attention varlen entry point (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention_available(device: str) -> bool:
    if device != "cuda" or _varlen_kernel() is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8  # flash attention needs Ampere or newer


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention function for packed rows: (1, heads, tokens, dim) in, (1, tokens,
    heads, dim) out, causal within each sequence that ``cu_seq_lens_*`` delimit."""
    if cu_seq_lens_q is None:
        # Not a packed batch (e.g. a validation batch built elsewhere): plain causal SDPA is only
        # right for unpadded rows, which is all this implementation is switched on for.
        if attention_mask is not None:
            raise ValueError("peftbench's varlen attention got a padding mask; it is meant for packed rows only")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one row per pass")
    varlen_attn = _varlen_kernel()
    kernel_dtype = result_dtype = query.dtype
    if query.dtype not in (torch.float16, torch.bfloat16):
        # QLoRA keeps the residual stream in fp32 (peft casts norms up), so rotary embeddings hand
        # fp32 q/k here. Under autocast SDPA would run in the autocast dtype and return it; flash
        # has no fp32 at all, so cast by hand, and hand fp32 back when there is no autocast.
        autocast = torch.is_autocast_enabled(query.device.type)
        kernel_dtype = torch.get_autocast_dtype(query.device.type) if autocast else torch.bfloat16
        result_dtype = kernel_dtype if autocast else query.dtype
    q, k, v = (t[0].transpose(0, 1).to(kernel_dtype).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    params = _VARLEN_PARAMETERS or frozenset(inspect.signature(varlen_attn).parameters)
    extra: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # older torch: repeat the key/value heads for grouped-query attention
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if "window_size" in params:  # torch >= 2.11 spells causal as a (-1, 0) window
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params:
        extra["scale"] = scaling
    out = varlen_attn(q, k, v, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
                      int(max_length_q), int(max_length_k), **extra)
    return out.unsqueeze(0).to(result_dtype), None


# varlen_attn's keyword names (they changed between torch releases), read once at registration rather than
# on every call: inspect.signature inside a compiled layer would break its graph.
_VARLEN_PARAMETERS: frozenset[str] = frozenset()


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    global _VARLEN_PARAMETERS
    _VARLEN_PARAMETERS = frozenset(inspect.signature(_varlen_kernel()).parameters)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


@contextlib.contextmanager
def packed_attention(model, enabled: bool):
    """Switch the model's attention to the varlen kernel for the duration (training on packed
    rows); generation afterwards goes back to the implementation the model was loaded with."""
    if not enabled:
        yield
        return
    register_varlen_attention()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = VARLEN_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


# --- compilation ---------------------------------------------------------------------------------


def compile_available(device: str) -> tuple[bool, str]:
    """Whether torch.compile can fuse kernels here, and why not. Inductor generates triton kernels on
    a GPU; on the CPU it would build C++ for minutes of a run that is bound by its matmuls anyway."""
    if device != "cuda":
        return False, f"no compilation on {device}: its steps are bound by matmuls, not by kernel launches"
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton), so inductor cannot generate GPU kernels"
    return True, "triton found"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (``...DecoderLayer`` in a ModuleList), the unit regional
    compilation compiles; empty for a model without them."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__.endswith("DecoderLayer"):
            return list(module)
    return []


COMPILE_BACKEND = "inductor"  # torch.compile's default; tests use "aot_eager" (the same tracing, no code generation)


@contextlib.contextmanager
def compiled_layers(model, enabled: bool):
    """Run the decoder layers through torch.compile for the duration (training); generation
    afterwards uses the eager layers, whose KV-cache shapes would only cause recompilations.

    A layer that dynamo cannot compile runs eagerly instead of failing the run
    (``suppress_errors``); the note in run.json says compilation was asked for, the speed says
    whether it took."""
    layers = decoder_layers(model) if enabled else []
    if not layers:
        yield
        return
    import torch._dynamo

    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True, backend=COMPILE_BACKEND)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
        torch._dynamo.config.suppress_errors = suppress


# --- 4-bit layers under compilation ---------------------------------------------------------------
#
# bitsandbytes 0.50's 4-bit matmul for a training pass (thousands of rows) is its fallback: dequantise the
# nested absmax, then the NF4 weight, then F.linear, each a Python call into bitsandbytes' own op, and the
# backward dequantises again the same way. Inside a compiled layer these stay opaque calls, each with its own
# Python dispatch and kernels, in a step bound by the host (profile: benchmarks/results/2026-12-05/). Written as plain tensor operations, the same
# dequantisation is one kernel that inductor generates and launches with the layer's other kernels. The result
# is bit for bit bitsandbytes' (the same table lookups and float32 products, cast to the compute dtype; checked
# on the CPU by tests/test_speed.py), and only the packed weight is kept for backward, as bitsandbytes keeps it.


def dequantize_nf4(packed, absmax, code, shape, dtype, blocksize, nested=None):
    """A bitsandbytes 4-bit weight as a ``dtype`` tensor of ``shape``, in tensor operations (no bitsandbytes).
    ``packed``: uint8, two 4-bit codes a byte (high nibble first); ``absmax``: one scale per ``blocksize``
    values, or with ``nested`` = (absmax2, code2, offset, blocksize2) uint8 indices into ``code2`` scaled per
    ``blocksize2`` scales and shifted by ``offset`` (double quantisation)."""
    if nested is not None:
        absmax2, code2, offset, blocksize2 = nested
        scales = _blockwise(code2[absmax.long()], absmax2, blocksize2)[: absmax.numel()] + offset
    else:
        scales = absmax.float()
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1).long()
    return _blockwise(code[codes], scales, blocksize)[: math.prod(shape)].to(dtype).reshape(shape)


def _blockwise(values, scales, blocksize: int):
    """values (float32, flat) times one scale per consecutive ``blocksize`` of them (the last block may be short)."""
    short = (-values.numel()) % blocksize
    if short:
        values = torch.nn.functional.pad(values, (0, short))
    return (values.reshape(-1, blocksize) * scales.reshape(-1, 1)).reshape(-1)


def _dequantize_matmul(x, packed, absmax, code, absmax2, code2, offset, meta):
    shape, dtype, blocksize, blocksize2 = meta
    nested = None if absmax2 is None else (absmax2, code2, offset, blocksize2)
    return x @ dequantize_nf4(packed, absmax, code, shape, dtype, blocksize, nested).t()


def _recompute_all_but_matmul(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.MUST_RECOMPUTE


def _fused_4bit_forward(self, x):
    """y = x W^T for the frozen 4-bit W, dequantised in forward and again in backward, never kept between them.

    The recomputation is a selective checkpoint: under torch.compile the partitioner decides what backward keeps, and
    left to itself (a custom autograd.Function that saved only the packed weight) it kept W, a bf16 copy of every 4-bit
    weight, which put QLoRA's peak above LoRA's on a bf16 base (benchmarks/results/2026-12-05/README.md). Marked
    must-recompute, only the packed weight and its scales are kept (checked on
    the CPU with inductor's partitioner: tests/test_speed.py)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    packed, absmax, code, absmax2, code2, offset, meta = self._peftbench_nf4
    dtype = meta[1]
    out = checkpoint(_dequantize_matmul, x.to(dtype), packed, absmax, code, absmax2, code2, offset, meta,
                     use_reentrant=False, context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                        _recompute_all_but_matmul))
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.to(x.dtype)


def _fusable_4bit_layers(model) -> list:
    """The model's bitsandbytes 4-bit layers that the fused forward can stand in for: on a GPU, unpacked,
    with a compute dtype set and a frozen bias (or none)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    layers = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if (isinstance(module, Linear4bit) and state is not None and module.weight.device.type == "cuda"
                and module.compute_dtype is not None and not getattr(state, "packing_format_for_cpu", False)
                and (module.bias is None or not module.bias.requires_grad)
                and (not state.nested or state.state2 is not None)):
            layers.append(module)
    return layers


@contextlib.contextmanager
def fused_4bit_layers(model, enabled: bool):
    """While training with compiled layers, bitsandbytes' 4-bit layers dequantise through
    ``dequantize_nf4`` (fused by inductor into the layer's kernels) instead of bitsandbytes' own ops;
    afterwards their own forward again."""
    layers = _fusable_4bit_layers(model) if enabled else []
    for module in layers:
        install_fused_4bit(module)
    try:
        yield len(layers)
    finally:
        for module in layers:
            remove_fused_4bit(module)


def install_fused_4bit(module) -> None:
    """``module`` (a bitsandbytes Linear4bit) computes through ``dequantize_nf4`` until ``remove_fused_4bit``."""
    state = module.weight.quant_state
    nested = state.nested
    module._peftbench_nf4 = (
        module.weight.data, state.absmax, state.code.to(module.weight.device, torch.float32),
        state.state2.absmax if nested else None, state.state2.code if nested else None,
        state.offset if nested else None,
        (tuple(state.shape), module.compute_dtype, state.blocksize, state.state2.blocksize if nested else None))
    module.forward = _fused_4bit_forward.__get__(module)


def remove_fused_4bit(module) -> None:
    del module.forward
    del module._peftbench_nf4


# --- memory --------------------------------------------------------------------------------------

# Activation bytes kept for backward, per token, per decoder layer, per unit of width: a rough
# count for adapters on a frozen Llama-style decoder (with an fp32 residual stream, hence the hidden-size
# coefficient). It errs towards checkpointing: measured peaks stayed well below its estimate
# (benchmarks/results/2026-12-04/README.md).
ACTIVATION_BYTES_PER_HIDDEN = 40
ACTIVATION_BYTES_PER_INTERMEDIATE = 10
CHECKPOINTING_MEMORY_FRACTION = 0.6  # of the free memory, what one pass's activations may take


def activation_bytes(config, tokens: int) -> int:
    """Rough activation memory of one pass of ``tokens`` tokens without gradient checkpointing."""
    hidden = getattr(config, "hidden_size", 0) or 0
    intermediate = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or 0
    per_token = layers * (ACTIVATION_BYTES_PER_HIDDEN * hidden + ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate)
    return int(per_token * tokens)


def checkpointing_needed(config, tokens: int, device: str) -> tuple[bool, str]:
    """Whether a pass of ``tokens`` tokens needs gradient checkpointing to fit, and why."""
    if device != "cuda":
        return False, f"no checkpointing on {device}: memory is not the limit there"
    from peftbench.kit import free_gpu_memory

    free = free_gpu_memory()
    need = activation_bytes(config, tokens)
    budget = CHECKPOINTING_MEMORY_FRACTION * free
    verdict = need > budget
    why = (f"activations of a {tokens}-token pass ~{need / 2**30:.1f} GiB "
           f"{'>' if verdict else '<='} {budget / 2**30:.1f} GiB ({CHECKPOINTING_MEMORY_FRACTION:.0%} of this run's free share)")
    return verdict, why


def longest_step_tokens(lengths: list[int], examples_per_step: int) -> int:
    """Tokens in the heaviest step any order could produce: the longest examples together."""
    return sum(sorted(lengths, reverse=True)[:examples_per_step])


# --- the plan ------------------------------------------------------------------------------------

LEAN_MAX_TOKENS = 2048  # memory-lean passes: activations of a few hundred MiB under checkpointing, still large GEMMs


@dataclass
class StepPlan:
    """How the Trainer runs an optimiser step: what it is handed, and how the passes are computed."""

    per_device_batch: int  # examples per Trainer batch
    grad_accum: int  # Trainer batches per optimiser step (1 unless ``stock``)
    collator: Any  # StepCollator, or for ``stock`` transformers' DataCollatorForSeq2Seq
    stock: bool  # the plain Trainer path: padded batches, the model's own loss
    gradient_checkpointing: bool
    varlen_attention: bool  # switch the model to the varlen kernel while training
    notes: list[str]
    compile: bool = False  # torch.compile the decoder layers while training


def plan_steps(model, tokenizer, train_dataset, options, device: str) -> StepPlan:
    """Turn the hf trainer's options into a StepPlan. ``options`` has batch_size, grad_accum,
    packing, max_tokens_per_batch, memory_lean, gradient_checkpointing and compile (bool or "auto")."""
    notes: list[str] = []
    compile_layers = _plan_compile(getattr(options, "compile", False), device, notes)
    per_step = options.batch_size * options.grad_accum
    lengths = [len(ids) for ids in train_dataset["input_ids"]]
    if _prompt_learning(model):
        # Prefix/prompt tuning put virtual tokens in front of each row (as key/values or as input
        # embeddings): a packed row would share them among its examples, and logits would not line
        # up with input positions. Train such methods the plain way.
        from transformers import DataCollatorForSeq2Seq

        notes.append("packing and label-only logits off: prompt-learning methods prepend virtual tokens to each row")
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
        checkpointing = options.gradient_checkpointing is True or (options.gradient_checkpointing == "auto" and options.memory_lean)
        return StepPlan(per_device_batch=options.batch_size, grad_accum=options.grad_accum, collator=collator, stock=True,
                        gradient_checkpointing=checkpointing, varlen_attention=False, notes=notes, compile=compile_layers)
    varlen = varlen_attention_available(device)
    # Without a varlen kernel a packed row is attended through SDPA with a block-diagonal mask over
    # the whole row: on a 2-core CPU that measured 24 s per quickstart step against 16 s padded.
    pack = options.packing is True or (options.packing == "auto" and varlen)
    if options.packing == "auto" and not varlen:
        notes.append("packing auto -> off: no varlen attention kernel on this device; padded passes of batch_size")
    if pack:
        max_tokens = options.max_tokens_per_batch
        if options.memory_lean:
            max_tokens = min(max_tokens or LEAN_MAX_TOKENS, LEAN_MAX_TOKENS)
        collator = StepCollator(tokenizer, pack=True, max_tokens=max_tokens)
        longest_pass = min(longest_step_tokens(lengths, per_step), max_tokens or 10**12)
        notes.append("packing: one row per pass, " + ("flash varlen attention" if varlen else
                     "SDPA with a block-diagonal mask (no varlen kernel on this device)"))
    else:
        collator = StepCollator(tokenizer, pack=False, max_examples=options.batch_size)
        longest_pass = options.batch_size * max(lengths, default=0)
        varlen = False
    if options.gradient_checkpointing == "auto":
        if options.memory_lean:
            checkpointing, why = True, "memory_lean"
        else:
            checkpointing, why = checkpointing_needed(model.config, longest_pass, device)
        notes.append(f"gradient checkpointing auto -> {'on' if checkpointing else 'off'}: {why}")
    else:
        checkpointing = bool(options.gradient_checkpointing)
    return StepPlan(per_device_batch=per_step, grad_accum=1, collator=collator, stock=False,
                    gradient_checkpointing=checkpointing, varlen_attention=varlen, notes=notes, compile=compile_layers)


def _plan_compile(asked: bool | str, device: str, notes: list[str]) -> bool:
    if asked is False:
        return False
    available, why = compile_available(device)
    if asked == "auto":
        notes.append(f"compile auto -> {'on' if available else 'off'}: {why}")
    elif available:
        notes.append("compile: decoder layers through torch.compile (the first steps compile them)")
    else:
        notes.append(f"compile: true -> off: {why}")
    return available


def _prompt_learning(model) -> bool:
    return any(getattr(config, "is_prompt_learning", False) for config in (getattr(model, "peft_config", None) or {}).values())


# --- the Trainer ---------------------------------------------------------------------------------


def step_trainer_class():
    """transformers.Trainer that runs each batch from ``StepCollator`` as one optimiser step: the
    passes' gradients are summed, the loss is ``label_token_loss``. Any other batch goes to the
    stock Trainer code. Built on demand so importing this module costs no transformers import."""
    from transformers import Trainer

    class StepTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if "passes" not in inputs:
                return super().training_step(model, inputs, num_items_in_batch)
            # The stock training_step calls model.train() every step: a walk over every module, a visible share
            # of a small model's host-bound step (py-spy, benchmarks/diagnostics/spy_summary.py). eval() and train() set the
            # whole tree, so the top module's flag says whether the walk has anything to do.
            if not model.training:
                model.train()
            if callable(getattr(self.optimizer, "train", None)):
                self.optimizer.train()
            passes = inputs["passes"]
            total = torch.zeros((), device=self.args.device)
            for i, one_pass in enumerate(passes):
                last = i == len(passes) - 1
                # Under DDP, all-reduce the gradients once per step, after the last pass.
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync, self.compute_loss_context_manager():
                    loss = label_token_loss(model, self._prepare_inputs(one_pass), inputs["num_label_tokens"])
                    self.accelerator.backward(loss)
                total += loss.detach()
            self.state.num_input_tokens_seen += self._tokens_all_processes(inputs["num_tokens"])
            return total

        def _clip_grad_norm(self, model):
            return clip_trainable_grad_norm(self, model, super()._clip_grad_norm)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if "passes" not in inputs:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = sum(label_token_loss(model, self._prepare_inputs(p), inputs["num_label_tokens"]).detach()
                           for p in inputs["passes"])
            return loss, None, None

        def _tokens_all_processes(self, tokens: int) -> int:
            if self.args.world_size <= 1:
                return tokens
            counted = torch.tensor(tokens, device=self.args.device, dtype=torch.int64)
            return int(self.accelerator.gather(counted).sum().item())

    return StepTrainer
