"""What a run ran on: package versions (named as peft's method_comparison names them) and the system."""

from __future__ import annotations

import os
import platform
from importlib import metadata

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


def system_info(policy) -> dict:
    import torch

    info = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
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
