"""Run records: run.json (peft method_comparison's run_info/train_info/meta_info layout plus
``eval``), written atomically so a killed process never leaves a half-written result.

peft's reader (``method_comparison/processing.py``) takes from each record: ``run_info``'s
``experiment_name``, ``created_at``, ``total_time``, ``peft_branch``, ``train_config["model_id"]`` and
``peft_config["peft_type"]`` (falsy for non-peft training); ``train_info``'s ``status``, ``train_time``,
``file_size``, ``accelerator_memory_max``/``_reserved_avg``/``_reserved_99th`` and the last entry of
``metrics`` (``test accuracy``, ``train loss``, ``train samples``, ``train total tokens``); and
``meta_info["package_info"]["<package>-version"]``. Everything here keeps those names."""

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


def memory_summary(samples: list[int]) -> dict[str, int | None]:
    """Mean and 99th percentile of the memory sampled at each optimiser step (peft's train_info keys)."""
    if not samples:
        return {"accelerator_memory_reserved_avg": None, "accelerator_memory_reserved_99th": None}
    import numpy as np

    return {"accelerator_memory_reserved_avg": int(np.mean(samples)),
            "accelerator_memory_reserved_99th": int(np.percentile(samples, 99))}


def peft_test_summary(record: dict, train_rows: int) -> dict:
    """The entry peft's tools read as the last of ``train_info.metrics``. Its "test accuracy" is the
    fine-tuned model's ROUGE-1 as a fraction (summaries have no accuracy; ROUGE-1 is what reports rank by)."""
    train, finetuned = record["train_info"], record["eval"]["finetuned"]
    epochs = max((h.get("epoch", 0) for h in train.get("metrics", [])), default=0)
    return {
        "step": train.get("steps"),
        "test accuracy": round(finetuned["rouge1"] / 100, 6),
        "train loss": train.get("final_loss"),
        "train samples": round(epochs * train_rows),
        "train total tokens": train.get("tokens_seen"),
    }


def peft_config_record(peft_config: dict) -> dict | None:
    """A model's ``peft_config`` ({adapter: config}) as the one JSON-safe dict peft's tools read."""
    if not peft_config:
        return None
    config = peft_config.get("default") or next(iter(peft_config.values()))
    return _json_safe(config.to_dict())


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)  # target_modules is a set; sorted so reruns match
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums (PeftType, TaskType)
        return value.value
    return value


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
    trainer = {k: v for k, v in recipe_dict.get("trainer", {}).items() if k != "name"}
    return {
        "run_info": {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_time": None,
            "experiment_name": experiment_name,
            "status": "running",
            "recipe": recipe_dict,
            # peft's tools: the training settings with the model id, and peft's git branch (none for a
            # released peft; theirs runs from a checkout)
            "train_config": {"model_id": recipe_dict.get("model", {}).get("name"), "seed": recipe_dict.get("seed"), **trainer},
            "peft_branch": None,
            "peft_config": None,
            "stages": {},
            "error_msg": "",
        },
        "train_info": {"status": "pending", "metrics": []},
        "meta_info": {},
        "eval": {},
        "exports": {},
    }
