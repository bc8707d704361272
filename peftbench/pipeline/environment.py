"""What a run ran on: package versions (named as peft's method_comparison names them) and the system."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("peftbench", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes",
            "rouge-score", "gguf", "llama-cpp-python")


def package_versions() -> dict[str, str | None]:
    """``{"torch-version": "2.x", ...}``: keys named as peft's method_comparison names them."""
    out = {}
    for name in PACKAGES:
        try:
            out[f"{name}-version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"{name}-version"] = None
    return out


def versions(package_info: dict) -> dict[str, str]:
    """``package_info`` as ``{package: version}`` for display, installed packages only."""
    return {k.removesuffix("-version"): v for k, v in package_info.items() if v and not k.endswith("-commit-hash")}


@functools.lru_cache(maxsize=1)
def _first_cpu() -> dict[str, str]:
    """The fields of the first CPU in Linux's /proc/cpuinfo (read once); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    return set(_first_cpu().get("flags", "").split())


# The instruction sets that changed what worked (AMX/AVX-512 crashed a native llama.cpp build and
# trained nothing in bf16 on the CPU) and so belong beside any figure measured on a CPU.
NOTABLE_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_description() -> str:
    """e.g. 'AMD EPYC, 2 cores (avx2)': where a figure was measured, in a report's words."""
    name = _first_cpu().get("model name") or platform.processor() or platform.machine()
    flags = [f for f in NOTABLE_CPU_FLAGS if f in cpu_flags()]
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(flags)})" if flags else "")


def system_info(policy) -> dict:
    import torch

    info = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "device": policy.device,
        "compute_dtype": policy.dtype_name,
        "accelerator": None,
    }
    if policy.device == "cuda":
        info["accelerator"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    from peftbench.pipeline.device import RUNS_SHARING_GPU_ENV, nvidia_mps_running

    if os.environ.get(RUNS_SHARING_GPU_ENV):  # side-by-side runs: speed and memory figures are shared ones
        info["runs_side_by_side"] = int(os.environ[RUNS_SHARING_GPU_ENV])
        if policy.device == "cuda":
            info["nvidia_mps"] = nvidia_mps_running()
    return info
