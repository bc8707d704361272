"""Resource checks: free disk before writing large results, and CUDA out-of-memory as a fix to try.

Both turn a late, cryptic failure (a half-written adapter, a 40-line CUDA traceback hours into a run)
into one PeftbenchError that says what is short, by how much, and what to change.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.files import human_bytes

# Filesystems report free space in blocks and other writers share the disk: keep a margin.
DISK_MARGIN = 1.10
DISK_SLACK_BYTES = 16 * 2**20


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_disk(directory: Path, needed_bytes: int, what: str) -> None:
    """Raise before writing ``what`` into ``directory`` when the disk cannot hold it."""
    required = int(needed_bytes * DISK_MARGIN) + DISK_SLACK_BYTES
    free = free_bytes(directory)
    if free < required:
        raise PeftbenchError(
            f"not enough free disk for {what} in '{directory}': needs about {human_bytes(required)}, "
            f"{human_bytes(free)} free.",
            f"free {human_bytes(required - free)} on that disk and continue with --resume, "
            "or run again with --output-dir on a larger disk.",
        )


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


def _numel(p) -> int:
    # bitsandbytes packs two 4-bit weights per byte; report the logical parameter count.
    if p.__class__.__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None:
        return int(p.quant_state.shape.numel())
    return p.numel()


def trainable_bytes(model) -> int:
    """What a saved adapter weighs: the trainable parameters in their own dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def merged_model_bytes(model, bytes_per_param: int = 2) -> int:
    """A merged checkpoint of ``model`` in 16-bit: every logical parameter (4-bit ones unpacked)."""
    _, total = count_parameters(model)
    return total * bytes_per_param


MEMORY_LEAN_TRAIN = (
    "trainer.batch_size={half} trainer.grad_accum={double} (same effective batch), "
    "trainer.gradient_checkpointing=true, and/or method qlora (4-bit base)"
)


@contextmanager
def out_of_memory_as_error(stage: str, recipe=None):
    """Turn torch.OutOfMemoryError inside the block into a PeftbenchError with memory-lean settings.

    ``recipe`` (a ResolvedRecipe) lets the fix quote the current batch sizes."""
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5 has only the latter
    try:
        yield
    except out_of_memory as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
        # torch's message goes on about allocator settings; what was asked for and what is free comes first
        first_line = ". ".join(first_line.split(". ")[:3])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise PeftbenchError(f"out of GPU memory during {stage} ({first_line}).", _lean_fix(stage, recipe)) from None


@contextmanager
def disk_full_as_error(stage: str, where):
    """Turn "No space left on device" (a checkpoint, the adapter) into a PeftbenchError with a fix."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PeftbenchError(
            f"the disk is full during {stage} ({human_bytes(free_bytes(where))} free at {where}): {e.strerror}.",
            "free space (or lower trainer.save_total_limit, or use --output-dir on a larger disk), "
            "then run the same command with --resume.") from None


def _lean_fix(stage: str, recipe) -> str:
    if stage.endswith("eval"):
        size = recipe.recipe.evaluation.batch_size if recipe is not None else 16
        lower = "e.g. evaluation.batch_size=16" if size == "auto" else f"e.g. evaluation.batch_size={max(1, size // 2)}"
        return (f"lower evaluation.batch_size (now {size}, {lower}) "
                "or evaluation.max_new_tokens, or use method qlora (4-bit base).")
    options = getattr(recipe, "trainer_options", None)
    batch, accum = getattr(options, "batch_size", None), getattr(options, "grad_accum", None)
    if batch and accum:
        lean = MEMORY_LEAN_TRAIN.format(half=max(1, batch // 2), double=accum * 2 if batch > 1 else accum)
        current = f" (now batch_size={batch}, grad_accum={accum})"
    else:
        lean = MEMORY_LEAN_TRAIN.format(half="N/2", double="2xM")
        current = ""
    return (f"use memory-lean settings{current}: {lean}; a shorter prompt.max_source_tokens also helps. "
            "Then run again with --overwrite.")
