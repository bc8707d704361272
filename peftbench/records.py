"""Run records: run.json (peft method_comparison's run_info/train_info/meta_info layout plus
``eval``), written atomically so a killed process never leaves a half-written result."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("peftbench", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes",
            "rouge-score", "gguf", "llama-cpp-python")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_directory(path: Path):
    """Yield an empty temporary directory beside ``path`` to write into; when the block succeeds it
    replaces ``path`` whole. A kill or an error mid-write leaves the previous ``path`` (or none),
    never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only directory
        yield tmp
        if path.exists():  # directories cannot be renamed over one another: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


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
    return info


def new_record(recipe_dict: dict, experiment_name: str) -> dict:
    return {
        "run_info": {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_time": None,
            "experiment_name": experiment_name,
            "status": "running",
            "recipe": recipe_dict,
            "peft_config": None,
            "stages": {},
            "error_msg": "",
        },
        "train_info": {"status": "pending", "metrics": []},
        "meta_info": {},
        "eval": {},
        "exports": {},
    }
