"""The pipeline: data, baseline evaluation, method, training, adapter, evaluation, exports, record.

Each stage's status, time and error go into run.json as soon as the stage ends, so a crash or a
kill leaves a truthful record, and a failing export never takes the adapter or the scores with it.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peftbench.pipeline import distributed
from peftbench.console import console
from peftbench.pipeline.context import RunContext
from peftbench.pipeline.device import resolve_policy
from peftbench.errors import PeftbenchError, StageRefused
from peftbench.pipeline.evaluation import evaluate_model
from peftbench.pipeline.modeling import load_tokenizer, resolve_model_source
from peftbench.pipeline.recipe import ResolvedRecipe
from peftbench.pipeline.record import (atomic_write_json, atomic_write_text, dir_size, memory_summary, new_record, package_versions,
                               peft_config_record, peft_test_summary, read_json, system_info)
from peftbench.pipeline.record import atomic_directory
from peftbench.pipeline.report import render_run_report, print_run_summary
from peftbench.pipeline.resources import count_parameters, ensure_free_disk, out_of_memory_as_error, trainable_bytes


def default_run_dir(recipe: ResolvedRecipe) -> Path:
    return Path(recipe.recipe.output_dir or Path("runs") / Path(recipe.source).stem)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A run gets its own directory; a finished run is never overwritten by accident."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PeftbenchError(f"output directory '{run_dir}' is a file.", "pass --output-dir DIR with a directory.")
    if run_dir.exists() and any(run_dir.iterdir()):
        status = recorded_status(run_dir)
        if status is None:
            raise PeftbenchError(
                f"output directory '{run_dir}' is not empty and holds no peftbench run (no run.json).",
                "pass --output-dir DIR with a new or empty directory (peftbench deletes only its own run directories).",
            )
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            if status == "success":
                raise PeftbenchError(f"run '{run_dir}' already finished.", "use --overwrite to run it again, or --output-dir for a new run.")
        else:
            what = "holds a finished run" if status == "success" else f"holds an unfinished run ({status})"
            raise PeftbenchError(
                f"output directory '{run_dir}' {what}.",
                "pass --resume to continue it, --overwrite to replace it, or --output-dir DIR for a new run.",
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def recorded_status(run_dir: Path) -> str | None:
    """The status run_dir/run.json records; None when the directory holds no peftbench run."""
    path = run_dir / "run.json"
    if not path.is_file():
        return "starting" if (run_dir / "recipe.yaml").is_file() else None
    try:
        return str(read_json(path)["run_info"]["status"])
    except (OSError, ValueError, KeyError, TypeError):  # edited by hand or truncated by a full disk
        return "unreadable"


class Run:
    def __init__(self, recipe: ResolvedRecipe, run_dir: Path, resume: bool = False, writes_record: bool = True):
        self.recipe = recipe
        self.run_dir = run_dir
        self.resume = resume
        self.writes_record = writes_record  # only the main process of a multi-process run writes run.json
        self.record = new_record(recipe.resolved_dict(), experiment_name=run_dir.name)
        self.started = time.perf_counter()

    def save_record(self) -> None:
        if not self.writes_record:
            return
        self.record["run_info"]["total_time"] = round(time.perf_counter() - self.started, 2)
        atomic_write_json(self.run_dir / "run.json", self.record)

    @contextmanager
    def stage(self, name: str, *, fatal: bool = True):
        console.rule(f"[bold]{name}")
        entry = self.record["run_info"]["stages"].setdefault(name, {})
        entry.update(status="running", error=None)
        start = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            # A stage that declines this configuration (StageRefused) is not broken: say so.
            entry.update(status="refused" if isinstance(e, StageRefused) else "failed", error=f"{type(e).__name__}: {e}",
                         seconds=round(time.perf_counter() - start, 2))
            if fatal or not isinstance(e, Exception):
                self.record["run_info"]["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                self.record["run_info"]["error_msg"] = entry["error"]
                self.save_record()
                raise
            console.print(f"[red]stage {name} {entry['status']}:[/] {entry['error']} (the run goes on)")
        else:
            if entry["status"] == "running":
                entry["status"] = "success"
            entry["seconds"] = round(time.perf_counter() - start, 2)
        self.save_record()


def evaluate_with_progress(label: str, model, tokenizer, recipe: ResolvedRecipe, split):
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(split))
        return evaluate_model(model, tokenizer, recipe.recipe.prompt, split, recipe.recipe.evaluation,
                              progress=lambda n: progress.advance(task, n))


def run_recipe(recipe: ResolvedRecipe, run_dir: Path | None = None, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one recipe end to end; returns the run record (also written to run_dir/run.json)."""
    r = recipe.recipe
    run_dir = Path(run_dir or default_run_dir(recipe))
    policy = resolve_policy(r.model.dtype)
    # Under `accelerate launch` every process trains; only the main one touches the run directory.
    processes = distributed.start(policy.device)
    processes.on_main(prepare_run_dir, run_dir, resume=resume, overwrite=overwrite)
    run = Run(recipe, run_dir, resume=resume, writes_record=processes.is_main)
    record = run.record
    if processes.is_main:
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    run.save_record()  # run.json from the first moment: it marks the directory as a peftbench run

    ctx = RunContext(recipe=recipe, run_dir=run_dir, policy=policy, model_source="", resume=resume, record=record)
    record["meta_info"] = {"model_id": r.model.name, "package_info": package_versions(), "system_info": system_info(policy),
                           "policy_substitutions": policy.substitutions}

    with run.stage("data") as st, processes.main_first():
        data = recipe.dataset.load(recipe.dataset_options, r.seed)
        eval_split_name = r.evaluation.split if r.evaluation.split in data.splits else "validation"
        if eval_split_name != r.evaluation.split:
            policy.note(f"evaluation split {r.evaluation.split} -> validation: the dataset has no {r.evaluation.split} split")
        eval_split = data.splits[eval_split_name]
        if r.evaluation.max_samples:
            eval_split = eval_split.select(range(min(r.evaluation.max_samples, len(eval_split))))
        ctx.eval_dataset = eval_split
        record["meta_info"]["dataset_info"] = {"name": recipe.dataset.name, **data.stats, "eval_split": eval_split_name,
                                               "eval_rows": len(eval_split)}
        st["rows"] = data.stats.get("rows")

    with run.stage("model"), processes.main_first():  # a GGUF is dequantised into the cache once
        ctx.model_source = resolve_model_source(r.model.name, r.model.gguf_file)
        ctx.tokenizer = load_tokenizer(ctx.model_source, r.model.trust_remote_code, r.model.revision)
        base = ctx.load_base_model()

    if r.evaluation.baseline and processes.is_main:
        with run.stage("baseline_eval"), out_of_memory_as_error("baseline_eval", recipe):
            baseline = evaluate_with_progress("baseline", base, ctx.tokenizer, recipe, eval_split)
            record["eval"]["baseline"] = baseline.as_record()
            _write_predictions(run_dir / "predictions_baseline.jsonl", eval_split, baseline.predictions)
    processes.wait_for_everyone()  # the others wait while the main process scores the base model

    with run.stage("method"):
        from transformers import set_seed

        set_seed(r.seed)  # the method's initialisation (LoRA's A matrices, prefixes) is part of what the seed fixes
        ctx.model = recipe.method.apply(base, recipe.method_options, ctx)
        trainable, total = count_parameters(ctx.model)
        record["train_info"].update(num_trainable_params=trainable, num_total_params=total,
                                    trainable_percent=round(100 * trainable / total, 4))
        record["run_info"]["peft_config"] = peft_config_record(getattr(ctx.model, "peft_config", None))
        console.print(f"{recipe.method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")

    from peftbench.pipeline.chat import tokenize_for_training

    with run.stage("train"), out_of_memory_as_error("training", recipe):
        with processes.main_first():  # datasets caches the tokenised splits: one process writes them
            train_ds = tokenize_for_training(data.splits["train"], ctx.tokenizer, r.prompt)
            val = data.splits.get("validation")
            val_ds = tokenize_for_training(val, ctx.tokenizer, r.prompt) if val is not None else None
        result = recipe.trainer.train(ctx.model, ctx.tokenizer, train_ds, val_ds, recipe.trainer_options, ctx)
        record["train_info"].update(
            status="success", train_time=round(result.train_time_s, 2), steps=result.steps,
            tokens_seen=result.tokens_seen, tokens_per_second=round(result.tokens_seen / max(result.train_time_s, 1e-9), 1),
            final_loss=result.final_loss, accelerator_memory_max=result.peak_memory_bytes, metrics=result.loss_history,
            num_processes=processes.num_processes, global_batch_size=result.global_batch_size,
            **memory_summary(result.memory_samples),
        )
        if result.resumed_from_step is not None:
            # Time, speed and peak memory of a resumed run cover only the steps after the checkpoint
            # (none at all when it was the last): report them as unknown rather than wrong.
            record["train_info"].update(resumed_from_step=result.resumed_from_step, train_time=None,
                                        tokens_per_second=None, accelerator_memory_max=None)

    # Training was the one stage that needs every process; the rest happens once, on the main one.
    if not processes.is_main:
        processes.close()
        return record

    with run.stage("save_adapter"):
        ensure_free_disk(run_dir, trainable_bytes(ctx.model), "the adapter")
        with atomic_directory(ctx.adapter_dir) as tmp:  # a kill mid-save never leaves a half adapter
            recipe.method.save(ctx.model, tmp)
        record["train_info"]["file_size"] = dir_size(ctx.adapter_dir)

    with run.stage("finetuned_eval"), out_of_memory_as_error("finetuned_eval", recipe):
        finetuned = evaluate_with_progress("fine-tuned", ctx.model, ctx.tokenizer, recipe, eval_split)
        record["eval"]["finetuned"] = finetuned.as_record()
        record["train_info"]["metrics"].append(peft_test_summary(record, train_rows=len(train_ds)))
        _write_predictions(run_dir / "predictions_finetuned.jsonl", eval_split, finetuned.predictions)

    for exporter, options in recipe.exporters:
        with run.stage(f"export:{exporter.name}", fatal=False) as st:
            ensure_free_disk(ctx.exports_dir, exporter.estimated_bytes(options, ctx), f"the {exporter.name} export")
            result = exporter.export(options, ctx)
            record["exports"][exporter.name] = {"files": result.files, "sizes": result.sizes, **result.info}
            if result.problems:
                st.update(status="failed", error="; ".join(result.problems))
                console.print(f"[red]export {exporter.name}:[/] {st['error']}")

    record["run_info"]["status"] = "success"
    run.save_record()
    atomic_write_text(run_dir / "report.md", render_run_report(record))
    print_run_summary(record, run_dir)
    processes.close()
    return record


def _write_predictions(path: Path, split, predictions: list[str]) -> None:
    import json

    lines = [json.dumps({"id": i, "prediction": p, "reference": s}, ensure_ascii=False)
             for i, p, s in zip(split["id"], predictions, split["summary"])]
    atomic_write_text(path, "\n".join(lines) + "\n")
