"""Run records: run.json (peft method_comparison's run_info/train_info/meta_info layout plus
``eval``), written atomically so a killed process never leaves a half-written result.

peft's reader (``method_comparison/processing.py``) takes from each record: ``run_info``'s
``experiment_name``, ``created_at``, ``total_time``, ``peft_branch``, ``train_config["model_id"]`` and
``peft_config["peft_type"]`` (falsy for non-peft training); ``train_info``'s ``status``, ``train_time``,
``file_size``, ``accelerator_memory_max``/``_reserved_avg``/``_reserved_99th`` and the last entry of
``metrics`` (``test accuracy``, ``train loss``, ``train samples``, ``train total tokens``); and
``meta_info["package_info"]["<package>-version"]``. Everything here keeps those names.

``RunRecord`` owns the file: it creates the layout, tracks each stage's status, time and error, and
saves after every stage, so a crash or a kill leaves a truthful record."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from peftbench.console import console
from peftbench.errors import StageRefused
from peftbench.files import atomic_write_json, read_json

RECORD_FILE = "run.json"


class RunRecord:
    """run.json of one run: ``data`` is the record (run_info, train_info, meta_info, eval, exports)."""

    def __init__(self, recipe_dict: dict, run_dir: Path, *, writes: bool = True):
        self.run_dir = Path(run_dir)
        self.writes = writes  # only the main process of a multi-process run writes run.json
        self.data = new_record(recipe_dict, experiment_name=self.run_dir.name)
        self.started = time.perf_counter()

    @classmethod
    def reopen(cls, run_dir: Path) -> "RunRecord":
        """The run.json of a finished run, to add to (`peftbench export`): every field kept, and
        ``total_time`` stays the run's own."""
        record = cls.__new__(cls)
        record.run_dir, record.writes = Path(run_dir), True
        record.data = read_json(record.run_dir / RECORD_FILE)
        record.started = None
        return record

    def save(self) -> None:
        if not self.writes:
            return
        if self.started is not None:
            self.data["run_info"]["total_time"] = round(time.perf_counter() - self.started, 2)
        atomic_write_json(self.run_dir / RECORD_FILE, self.data)

    @contextmanager
    def stage(self, name: str, *, fatal: bool = True):
        """Record the block as stage ``name``; a non-fatal stage's exception is recorded and swallowed."""
        console.rule(f"[bold]{name}")
        entry = self.data["run_info"]["stages"].setdefault(name, {})
        entry.update(status="running", error=None)
        start = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            # A stage that declines this configuration (StageRefused) is not broken: say so.
            entry.update(status="refused" if isinstance(e, StageRefused) else "failed", error=f"{type(e).__name__}: {e}",
                         seconds=round(time.perf_counter() - start, 2))
            if fatal or not isinstance(e, Exception):
                self.data["run_info"]["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                self.data["run_info"]["error_msg"] = entry["error"]
                try:
                    self.save()
                except OSError as save_error:  # a full disk cannot take run.json either: the error still goes up
                    console.print(f"[red]could not record the failure in {RECORD_FILE}:[/] {save_error.strerror}")
                raise
            console.print(f"[red]stage {name} {entry['status']}:[/] {entry['error']} (the run goes on)")
        else:
            if entry["status"] == "running":
                entry["status"] = "success"
            entry["seconds"] = round(time.perf_counter() - start, 2)
        self.save()


def default_run_dir(source: str, output_dir: str | Path | None = None) -> Path:
    """Where a run (or a comparison) writes: ``output_dir``, else runs/<recipe file stem>."""
    return Path(output_dir or Path("runs") / Path(source).stem)


def recorded_status(run_dir: Path) -> str | None:
    """The status run_dir/run.json records; None when the directory holds no peftbench run (a
    run.json that is not peftbench's layout does not make one)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)["run_info"]
        if not isinstance(info, dict) or "stages" not in info or "experiment_name" not in info:
            return None
        return str(info["status"])
    except (OSError, ValueError, KeyError, TypeError):  # edited by hand or truncated by a full disk
        return "unreadable" if path.stat().st_size == 0 else None


def first_non_finite(log_history: list[dict]) -> tuple[str, float, int | None] | None:
    """(key, value, step) of the first NaN/inf loss, grad norm or eval loss in the trainer's log."""
    for entry in log_history or []:
        for key in ("loss", "grad_norm", "eval_loss"):
            value = entry.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                return key, value, entry.get("step")
    return None


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
