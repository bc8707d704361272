"""The pipeline: data, baseline evaluation, method, training, adapter, evaluation, exports, record.

``run_recipe`` reads as its stages, each a short function below it. Each stage's status, time and
error go into run.json as soon as the stage ends (``RunRecorder.stage``), so a crash or a kill leaves a
truthful record, and a failing export never takes the adapter or the scores with it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peftbench.console import console
from peftbench.errors import PeftbenchError
from peftbench.files import atomic_directory, atomic_write_text, dir_size
from peftbench.pipeline import distributed
from peftbench.pipeline.context import RunContext
from peftbench.pipeline.device import resolve_policy
from peftbench.pipeline.environment import package_versions, system_info
from peftbench.pipeline.evaluation import evaluate_model
from peftbench.pipeline.forgetting import load_texts, paired_change, text_loss
from peftbench.pipeline.modeling import load_tokenizer, resolve_model_source
from peftbench.pipeline.recipe import ResolvedRecipe
from peftbench.pipeline.record import (DatasetInfo, ExportRecord, Forgetting, MetaInfo, RunRecorder, Scores, SystemInfo,
                                       TextLossRecord, TrainInfo,
                                       default_run_dir as run_dir_for, memory_summary, peft_config_record,
                                       peft_test_summary, read_record, recorded_status)
from peftbench.pipeline.report import print_run_summary, render_run_report
from peftbench.pipeline.resources import (count_parameters, disk_full_as_error, ensure_free_disk, out_of_memory_as_error,
                                          trainable_bytes)


def default_run_dir(recipe: ResolvedRecipe) -> Path:
    return run_dir_for(recipe.source, recipe.recipe.output_dir)


# What a run writes into its directory; --overwrite deletes these and nothing else.
RUN_ENTRIES = ("run.json", "recipe.yaml", "report.md", "run.log", "predictions_*.jsonl", "adapter", "checkpoints", "exports",
               ".*.tmp", ".*.old")
# Open directory descriptors holding a run directory's lock, kept for the life of the process.
_LOCKS: dict[Path, int] = {}


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, claim: bool = True) -> None:
    """A run gets its own directory; a finished run is never overwritten by accident, a directory that
    is not a peftbench run is never written into or deleted, and one process at a time owns it.
    ``claim``: take the directory (an advisory lock held until the process ends, then --overwrite's
    deletion); without it, only check what a claim would refuse (a launcher does, before its processes)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PeftbenchError(f"output directory '{run_dir}' is a file.", "pass --output-dir DIR with a directory.")
    if claim:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PeftbenchError(f"cannot create output directory '{run_dir}': {e.strerror}.",
                                 "pass --output-dir DIR in a place you can write to.") from None
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PeftbenchError(f"output directory '{run_dir}' is not writable.",
                                 "pass --output-dir DIR in a place you can write to.")
        _lock(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        status = recorded_status(run_dir)
        if status is None:
            raise PeftbenchError(
                f"output directory '{run_dir}' is not empty and holds no peftbench run (no run.json written by peftbench).",
                "pass --output-dir DIR with a new or empty directory (peftbench deletes only its own run directories).",
            )
        if overwrite:
            foreign = sorted(p.name for p in run_dir.iterdir() if not _is_run_entry(p.name))
            if foreign:
                raise PeftbenchError(
                    f"--overwrite would delete '{run_dir}', which also holds files peftbench did not write: "
                    f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}.",
                    "move them out, or pass --output-dir DIR for a new run.")
            if claim:
                _remove_run_files(run_dir, keep_dir=True)  # the lock is held on the directory itself
        elif resume:
            if status == "success":
                raise PeftbenchError(f"run '{run_dir}' already finished.", "use --overwrite to run it again, or --output-dir for a new run.")
            if claim:  # what a killed atomic write left behind (.adapter.XXXX.tmp, .run.json.XXXX.tmp)
                for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.old")]:
                    _delete(stale)
        else:
            what = "holds a finished run" if status == "success" else f"holds an unfinished run ({status})"
            raise PeftbenchError(
                f"output directory '{run_dir}' {what}.",
                "pass --resume to continue it, --overwrite to replace it, or --output-dir DIR for a new run.",
            )
    if claim:
        run_dir.mkdir(parents=True, exist_ok=True)


def require_same_recipe(run_dir: Path, resolved: dict) -> None:
    """--resume continues the run that is there: the same recipe, value for value."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return  # killed before the recipe was written: nothing was trained yet
    before = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    now = _flatten(resolved)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise PeftbenchError(
            f"--resume with a recipe that differs from the run's ({shown}{' ...' if len(changed) > 4 else ''}).",
            "resume with the same recipe and overrides, or start a new run (--output-dir DIR, or --overwrite).")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _is_run_entry(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in RUN_ENTRIES)


def _lock(run_dir: Path) -> None:
    """flock on the directory itself: released by the kernel when the process ends, however it ends."""
    import fcntl

    key = run_dir.resolve()
    if key in _LOCKS:
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PeftbenchError(f"output directory '{run_dir}' is in use by another peftbench process.",
                             "wait for it to finish (or stop it), or pass --output-dir DIR for a new run.") from None
    _LOCKS[key] = fd


def claim_run_dir(run_dir: Path) -> None:
    """Hold a run directory for this process (`peftbench export` on a finished run), as a run does."""
    _lock(run_dir)


def release_run_dir(run_dir: Path) -> None:
    fd = _LOCKS.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


# Stages that only read the user's input: a run that fails in them never started.
INPUT_STAGES = ("data", "model")


def _never_started(run_dir: Path) -> bool:
    try:
        stages = read_record(run_dir).run_info.stages
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return set(stages) <= set(INPUT_STAGES)


def _delete(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _remove_run_files(run_dir: Path, keep_dir: bool = False) -> None:
    """Delete what a run writes (RUN_ENTRIES) and nothing else; the directory too once it is empty."""
    for entry in run_dir.iterdir():
        if _is_run_entry(entry.name):
            _delete(entry)
    if not keep_dir and not any(run_dir.iterdir()):
        run_dir.rmdir()


def run_recipe(recipe: ResolvedRecipe, run_dir: Path | None = None, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one recipe end to end; returns the run record as run_dir/run.json holds it."""
    run_dir = Path(run_dir or default_run_dir(recipe))
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    with ExitStack() as on_exit:
        # The process may go on (tests, comparisons): let the next run have the directory.
        on_exit.callback(release_run_dir, run_dir)
        ctx = start(recipe, run_dir, resume=resume, overwrite=overwrite, on_exit=on_exit)
        try:
            load_data(ctx)
            load_base_model(ctx)
        except PeftbenchError:
            if fresh and _never_started(run_dir):
                _remove_run_files(run_dir)  # bad data or model: nothing ran, nothing to keep
            raise
        evaluate_baseline(ctx)
        apply_method(ctx)
        train(ctx)
        # Training was the one stage that needs every process; the rest happens once, on the main one.
        if ctx.processes.is_main:
            save_adapter(ctx)
            evaluate_finetuned(ctx)
            export(ctx)
            finish(ctx)
        ctx.processes.close()
        return ctx.record.as_json()


def start(recipe: ResolvedRecipe, run_dir: Path, *, resume: bool, overwrite: bool, on_exit: ExitStack) -> RunContext:
    """The run directory (claimed), run.json from the first moment, then recipe.yaml."""
    policy = resolve_policy(recipe.recipe.model.dtype)
    # Under `accelerate launch` every process trains; only the main one touches the run directory.
    processes = distributed.start(policy.device)
    processes.on_main(prepare_run_dir, run_dir, resume=resume, overwrite=overwrite)
    if resume:
        processes.on_main(require_same_recipe, run_dir, recipe.resolved_dict())
    recorder = RunRecorder.start(recipe.resolved_dict(), run_dir, writes=processes.is_main)
    recorder.save()  # run.json from the first moment: it marks the directory as a peftbench run
    if processes.is_main:
        from peftbench.library_output import quiet_progress_bars, run_log

        quiet_progress_bars()  # transformers and datasets are imported by now
        on_exit.enter_context(run_log(run_dir / "run.log"))  # library output, for this run
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    meta = recorder.record.meta_info = MetaInfo(model_id=recipe.recipe.model.name, package_info=package_versions(),
                                                system_info=SystemInfo.model_validate(system_info(policy)))
    meta.policy_substitutions = policy.substitutions  # the same list: what the policy notes later is recorded too
    return RunContext(recipe=recipe, run_dir=run_dir, policy=policy, model_source="", resume=resume, recorder=recorder,
                      processes=processes)


def load_data(ctx: RunContext) -> None:
    r, policy = ctx.recipe.recipe, ctx.policy
    with ctx.recorder.stage("data") as st, ctx.processes.main_first():
        ctx.data = ctx.recipe.dataset.load(ctx.recipe.dataset_options, r.seed)
        if r.evaluation.split != "selection" and not {"validation", "test"} & set(ctx.data.splits):
            raise PeftbenchError("the dataset has only a train split, and peftbench evaluates on a test or validation split.",
                                 "add validation.jsonl (or test.jsonl) beside train.jsonl, in the same format.")
        split_name, ctx.eval_dataset = evaluation_split(r.evaluation, ctx.data, policy)
        ctx.record.meta_info.dataset_info = DatasetInfo.model_validate(
            {"name": ctx.recipe.dataset.name, **ctx.data.stats, "eval_split": split_name, "eval_rows": len(ctx.eval_dataset)})
        st.rows = ctx.data.stats.get("rows")


# The selection split is drawn with its own fixed seed, not the run's: every run and every seed of a
# comparison then selects on the same rows and trains on the same rest.
SELECTION_SEED = 0


def carve_selection_split(data, size: int) -> None:
    """Move ``size`` seeded-random rows of train into a ``selection`` split (for choosing settings
    without touching the validation or test split a comparison reports)."""
    train = data.splits["train"]
    if size > len(train) // 2:
        raise PeftbenchError(f"evaluation.selection_size {size} would take more than half of the {len(train)} training rows.",
                             f"set evaluation.selection_size to at most {len(train) // 2}.")
    parts = train.train_test_split(test_size=size, seed=SELECTION_SEED, shuffle=True)
    data.splits["train"], data.splits["selection"] = parts["train"], parts["test"]
    data.stats.setdefault("rows", {}).update(train=len(parts["train"]), selection=size)
    data.stats["selection"] = f"{size} rows carved from train (seed {SELECTION_SEED}), not trained on"


def evaluation_split(evaluation, data, policy) -> tuple[str, Any]:
    """(name, rows) of the split a run scores: the recipe's, else validation; the first max_samples.
    `peftbench export` scores a finished run's GGUF on these same rows."""
    if evaluation.split == "selection" and "selection" not in data.splits:
        carve_selection_split(data, evaluation.selection_size)
    split_name = evaluation.split if evaluation.split in data.splits else "validation"
    if split_name != evaluation.split:
        policy.note(f"evaluation split {evaluation.split} -> validation: the dataset has no {evaluation.split} split")
    split = data.splits[split_name]
    if evaluation.max_samples:
        split = split.select(range(min(evaluation.max_samples, len(split))))
    return split_name, split


def load_base_model(ctx: RunContext) -> None:
    model = ctx.recipe.recipe.model
    with ctx.recorder.stage("model"), ctx.processes.main_first():  # a GGUF is dequantised into the cache once
        ctx.model_source = resolve_model_source(model.name, model.gguf_file)
        ctx.tokenizer = load_tokenizer(ctx.model_source, model.trust_remote_code, model.revision)
        ctx.base_model = ctx.load_base_model()
        require_targets_exist(ctx.base_model, getattr(ctx.recipe.method_options, "target_modules", None))


def require_targets_exist(model, targets) -> None:
    """Named target modules must exist in the model: checked before the baseline evaluation, so a
    misspelt name costs seconds, not a baseline run (peft checks only when the method is applied)."""
    from peftbench.pipeline.targets import module_matches

    if not isinstance(targets, (list, tuple)):
        return  # the architecture's default, or "all-linear"
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(module_matches(name, t) for name in names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names if "." in name and not name.rsplit(".", 1)[-1].isdigit()})
        raise PeftbenchError(f"method.target_modules names {missing}, which {type(model).__name__} does not have.",
                             f"use names of its modules, e.g. {', '.join(leaves[:12])}.")


def evaluate_baseline(ctx: RunContext) -> None:
    if ctx.recipe.recipe.evaluation.baseline and ctx.processes.is_main:
        with ctx.recorder.stage("baseline_eval"), out_of_memory_as_error("baseline_eval", ctx.recipe):
            baseline = evaluate_with_progress("baseline", ctx.base_model, ctx.tokenizer, ctx.recipe, ctx.eval_dataset)
            ctx.record.eval["baseline"] = Scores.model_validate(baseline.as_record())
            _write_predictions(ctx.run_dir / "predictions_baseline.jsonl", ctx.eval_dataset, baseline.predictions)
            probe_forgetting(ctx, "base", ctx.base_model)  # before the method wraps (and may change) the base model
    ctx.processes.wait_for_everyone()  # the others wait while the main process scores the base model


def apply_method(ctx: RunContext) -> None:
    recipe, train_info = ctx.recipe, ctx.record.train_info
    with ctx.recorder.stage("method"):
        from transformers import set_seed

        set_seed(recipe.recipe.seed)  # the method's initialisation (LoRA's A matrices, prefixes) is part of what the seed fixes
        ctx.model = recipe.method.apply(ctx.base_model, recipe.method_options, ctx)
        trainable, total = count_parameters(ctx.model)
        train_info.num_trainable_params, train_info.num_total_params = trainable, total
        train_info.trainable_percent = round(100 * trainable / total, 4)
        uses_peft = recipe.method.capabilities.uses_peft  # a peft.PeftModel, with the peft_config peft's tools read
        ctx.record.run_info.peft_config = peft_config_record(ctx.model.peft_config) if uses_peft else None
        console.print(f"{recipe.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")


def train(ctx: RunContext) -> None:
    from peftbench.pipeline.chat import tokenize_for_training

    recipe, prompt = ctx.recipe, ctx.recipe.recipe.prompt
    with ctx.recorder.stage("train"), out_of_memory_as_error("training", recipe), disk_full_as_error("training", ctx.run_dir):
        with ctx.processes.main_first():  # datasets caches the tokenised splits: one process writes them
            train_ds = tokenize_for_training(ctx.data.splits["train"], ctx.tokenizer, prompt)
            # the loss logged on held-out rows (trainer.eval_steps) uses the selection split when there is one
            val = ctx.data.splits.get("selection", ctx.data.splits.get("validation"))
            val_ds = tokenize_for_training(val, ctx.tokenizer, prompt) if val is not None else None
        result = recipe.trainer.train(ctx.model, ctx.tokenizer, train_ds, val_ds, recipe.trainer_options, ctx)
        ctx.train_rows = len(train_ds)
        record_training(ctx.record.train_info, result, ctx.processes.num_processes)


def record_training(train_info: TrainInfo, result, num_processes: int) -> None:
    """A TrainResult in run.json's train_info (peft's key names)."""
    figures = dict(
        status="success", train_time=round(result.train_time_s, 2), steps=result.steps,
        tokens_seen=result.tokens_seen, tokens_per_second=round(result.tokens_seen / max(result.train_time_s, 1e-9), 1),
        final_loss=result.final_loss, accelerator_memory_max=result.peak_memory_bytes, metrics=result.loss_history,
        num_processes=num_processes, global_batch_size=result.global_batch_size,
        **memory_summary(result.memory_samples),
    )
    if result.resumed_from_step is not None:
        # Time, speed and peak memory of a resumed run cover only the steps after the checkpoint
        # (none at all when it was the last): report them as unknown rather than wrong.
        figures.update(resumed_from_step=result.resumed_from_step, train_time=None,
                       tokens_per_second=None, accelerator_memory_max=None)
    for name, value in figures.items():
        setattr(train_info, name, value)


def save_adapter(ctx: RunContext) -> None:
    with ctx.recorder.stage("save_adapter"), disk_full_as_error("the adapter save", ctx.run_dir):
        ensure_free_disk(ctx.run_dir, trainable_bytes(ctx.model), "the adapter")
        with atomic_directory(ctx.adapter_dir) as tmp:  # a kill mid-save never leaves a half adapter
            ctx.recipe.method.save(ctx.model, tmp)
        ctx.record.train_info.file_size = dir_size(ctx.adapter_dir)


def evaluate_finetuned(ctx: RunContext) -> None:
    record = ctx.record
    with ctx.recorder.stage("finetuned_eval"), out_of_memory_as_error("finetuned_eval", ctx.recipe):
        finetuned = evaluate_with_progress("fine-tuned", ctx.model, ctx.tokenizer, ctx.recipe, ctx.eval_dataset)
        record.eval["finetuned"] = Scores.model_validate(finetuned.as_record())
        record.train_info.metrics.append(peft_test_summary(record, train_rows=ctx.train_rows))
        _write_predictions(ctx.run_dir / "predictions_finetuned.jsonl", ctx.eval_dataset, finetuned.predictions)
        probe_forgetting(ctx, "finetuned", ctx.model)


def probe_forgetting(ctx: RunContext, which: str, model) -> None:
    """The loss of ``model`` on general text as ``forgetting.<which>`` (base or finetuned), and the change
    once both are there. A model the probe cannot score gets a note in the record; the run goes on."""
    evaluation = ctx.recipe.recipe.evaluation
    if not evaluation.forgetting:
        return
    forgetting = ctx.record.forgetting = ctx.record.forgetting or Forgetting(
        texts=evaluation.forgetting_texts or "built-in", n_texts=0)
    try:
        texts = load_texts(evaluation.forgetting_texts)
        loss = text_loss(model, ctx.tokenizer, texts)
    except Exception as e:  # a method whose forward the probe cannot drive: a note, not a failed run
        forgetting.notes.append(f"{which}: not scored ({type(e).__name__}: {e})")
        console.print(f"[yellow]note:[/] forgetting probe of the {which} model skipped: {type(e).__name__}: {e}")
        return
    forgetting.n_texts = len(texts)
    setattr(forgetting, which, TextLossRecord(loss=loss.loss, perplexity=loss.perplexity, tokens=loss.tokens,
                                              per_text=loss.per_text))
    if forgetting.base is not None and forgetting.finetuned is not None:
        forgetting.change = forgetting.finetuned.loss - forgetting.base.loss
        forgetting.change_se = paired_change(forgetting.base.per_text, forgetting.finetuned.per_text)
    console.print(f"general-text loss ({which}): {loss.loss:.4f} (perplexity {loss.perplexity:.2f}, {len(texts)} texts)")


def export(ctx: RunContext) -> None:
    """Each exporter in the recipe's order; a failed export is recorded and the run goes on."""
    record = ctx.record
    for exporter, options in ctx.recipe.exporters:
        with ctx.recorder.stage(f"export:{exporter.name}", fatal=False) as st:
            ensure_free_disk(ctx.exports_dir, exporter.estimated_bytes(options, ctx), f"the {exporter.name} export")
            result = ctx.exports[exporter.name] = exporter.export(options, ctx)
            record.exports[exporter.name] = ExportRecord.model_validate({"files": result.files, "sizes": result.sizes,
                                                                         **result.info})
            record.eval.update({name: Scores.model_validate(scores) for name, scores in result.scores.items()})
            if result.problems:
                st.status, st.error = "failed", "; ".join(result.problems)
                console.print(f"[red]export {exporter.name}:[/] {st.error}")


def finish(ctx: RunContext) -> None:
    ctx.record.run_info.status = "success"
    # report.md before run.json says success: a kill in between leaves a run that --resume finishes.
    atomic_write_text(ctx.run_dir / "report.md", render_run_report(ctx.record))
    ctx.recorder.save()
    print_run_summary(ctx.record, ctx.run_dir)


def evaluate_with_progress(label: str, model, tokenizer, recipe: ResolvedRecipe, split):
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(split))
        return evaluate_model(model, tokenizer, recipe.recipe.prompt, split, recipe.recipe.evaluation,
                              progress=lambda n: progress.advance(task, n))


def _write_predictions(path: Path, split, predictions: list[str]) -> None:
    import json

    lines = [json.dumps({"id": i, "prediction": p, "reference": s}, ensure_ascii=False)
             for i, p, s in zip(split["id"], predictions, split["summary"])]
    atomic_write_text(path, "\n".join(lines) + "\n")
