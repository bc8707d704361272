"""Device and precision policy: what the recipe asked for, what this machine can do, and one log
line for each substitution."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Set by a comparison that runs N runs side by side (`--jobs N`): each plans its memory for a 1/N share.
RUNS_SHARING_GPU_ENV = "PEFTBENCH_RUNS_SHARING_GPU"


def free_gpu_memory() -> int:
    """Bytes of GPU memory this run may plan for: what is free now, divided among the runs that share
    the GPU. Runs started together each see the whole GPU free; planning on all of it (gradient
    checkpointing off, a large generation batch) put 17 side-by-side SAMSum runs at 138 of 141 GB."""
    free, _ = torch.cuda.mem_get_info()
    try:
        sharing = max(1, int(os.environ.get(RUNS_SHARING_GPU_ENV, "1")))
    except ValueError:
        sharing = 1
    return free // sharing


def nvidia_mps_running() -> bool:
    """Whether an NVIDIA MPS control daemon is up (its pipe directory: CUDA_MPS_PIPE_DIRECTORY, else
    /tmp/nvidia-mps). Without MPS, processes that share a GPU take turns in time slices; with it, their
    kernels run at the same time, which is what side-by-side runs of a small model need."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_dir, "control"))


@dataclass
class DevicePolicy:
    device: str  # "cuda", "mps" or "cpu"
    compute_dtype: torch.dtype
    substitutions: list[str] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    def optimizer(self, requested: str) -> str:
        """The Trainer ``optim`` to use. bitsandbytes' paged and 8-bit optimizers need a GPU."""
        if ("8bit" in requested or "paged" in requested) and not (self.device == "cuda" and bitsandbytes_available()):
            why = "no CUDA GPU" if self.device != "cuda" else "bitsandbytes is not installed"
            self.note(f"optimizer {requested} -> adamw_torch: {why} for bitsandbytes' paged 8-bit optimizers")
            return "adamw_torch"
        return requested

    def note(self, line: str) -> None:
        if line not in self.substitutions:
            self.substitutions.append(line)
            from peftbench.console import console

            console.print(f"[yellow]policy:[/] {line}")


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def detect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_policy(requested_dtype: str = "auto") -> DevicePolicy:
    device = detect_device()
    policy = DevicePolicy(device=device, compute_dtype=torch.float32)
    if device == "cuda":
        best = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        wanted = best if requested_dtype == "auto" else _DTYPES[requested_dtype]
        if wanted == torch.bfloat16 and best != torch.bfloat16:
            policy.note("compute dtype bfloat16 -> float16: this GPU has no bf16 support")
            wanted = torch.float16
        policy.compute_dtype = wanted
    else:
        # On CPUs bf16/fp16 matmuls are emulated and tens of times slower than fp32.
        if requested_dtype in ("bfloat16", "float16"):
            policy.note(f"compute dtype {requested_dtype} -> float32: half-precision matmuls are slow on {device}")
        policy.compute_dtype = torch.float32
    return policy


def resolve_compute_dtype(policy: DevicePolicy, requested: str) -> torch.dtype:
    """A dtype a plugin asked for (e.g. QLoRA's bnb_4bit_compute_dtype), squared with the device."""
    if requested == "auto":
        return policy.compute_dtype
    wanted = _DTYPES[requested]
    if wanted != policy.compute_dtype and (policy.device != "cuda" or wanted == torch.bfloat16 and policy.compute_dtype == torch.float16):
        policy.note(f"{requested} compute -> {policy.dtype_name} on {policy.device}")
        return policy.compute_dtype
    return wanted


def peak_memory_bytes(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except Exception:  # pragma: no cover - non-POSIX
        return None


def memory_in_use_bytes(device: str) -> int | None:
    """Memory held right now: the CUDA caching allocator's reservation, else this process's resident set."""
    if device == "cuda":
        return torch.cuda.memory_reserved()
    try:
        import psutil  # an accelerate dependency

        return psutil.Process().memory_info().rss
    except Exception:  # pragma: no cover - psutil missing or unsupported platform
        return None


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
