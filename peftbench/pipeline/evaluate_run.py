"""`peftbench evaluate RUN_DIR evaluation.key=value ...`: score a finished run's adapter again, with
other evaluation settings, without training again.

Decoding settings are chosen after training (beam search or not, a longer summary limit), and so is
the split: a setting is chosen on the `selection` split and only the chosen one is then scored on
the reported split. This module rebuilds the run's model the way `peftbench export` does (base model
on this machine, the run's adapter loaded again) and calls the runner's own evaluation. The scores
go into run.json under ``eval["finetuned[<settings>]"]`` and the answers into
``predictions_finetuned[<settings>].jsonl``; every other field of run.json stays as it was, and the
evaluation is listed in ``run_info.evaluations_after_run``. report.md shows the new row.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from peftbench.console import console
from peftbench.errors import PeftbenchError

# What can change between the run's own evaluation and this one. Anything else (the prompt, the
# method, the data) would score a model the run did not train, or on other terms.
# selection_size is not among them: the selection split must be the rows the run left out of training.
EVALUATION_KEYS = ("split", "max_samples", "batch_size", "max_new_tokens", "num_beams")


def evaluation_recipe(run_dir: Path, overrides: list[str]):
    """The run's recipe with the evaluation overrides applied, validated as `peftbench run` does."""
    from peftbench.pipeline.export_run import LOCATION_KEYS
    from peftbench.pipeline.recipe import apply_overrides, read_recipe_file, validate_recipe

    allowed = [f"evaluation.{k}" for k in EVALUATION_KEYS]
    changed = []
    for override in overrides:
        key, eq, _ = override.partition("=")
        if not eq or (key not in allowed and key not in LOCATION_KEYS):
            raise PeftbenchError(
                f"override '{override}' is not one `peftbench evaluate` takes.",
                f"change how the run is scored: {', '.join(k + '=...' for k in allowed)}; "
                f"or say where things are on this machine: {', '.join(k + '=...' for k in LOCATION_KEYS)}.")
        if key in allowed:
            changed.append(override)
    if not changed:
        raise PeftbenchError("nothing to change: the run was already scored with its recipe's evaluation settings.",
                             "pass what to score differently, e.g. evaluation.num_beams=4 or evaluation.split=selection.")
    raw = read_recipe_file(run_dir / "recipe.yaml")
    return validate_recipe(apply_overrides(raw, list(overrides)), source=str(run_dir / "recipe.yaml")), changed


def evaluation_key(changed: list[str]) -> str:
    """``finetuned[num_beams=4,split=selection]``: the run.json key and the predictions file's name."""
    return "finetuned[" + ",".join(sorted(o.removeprefix("evaluation.") for o in changed)) + "]"


def evaluate_run(run_dir: str | Path, overrides: list[str] = (), command: str | None = None) -> dict:
    """Score a finished run again with ``overrides`` (evaluation.key=value); returns its run.json as written."""
    from peftbench.pipeline.export_run import reopened_run, require_finished_run, save_with_report, what_the_export_reads
    from peftbench.pipeline.record import read_record
    from peftbench.pipeline.report import print_rouge_table
    from peftbench.pipeline.runner import _write_predictions, evaluate_with_progress

    source = require_finished_run(Path(run_dir))
    recipe, changed = evaluation_recipe(source, list(overrides))
    key = evaluation_key(changed)
    data = read_record(source).meta_info.dataset_info
    if recipe.recipe.evaluation.split == "selection" and "selection" not in ((data.rows if data else None) or {}):
        raise PeftbenchError(
            f"run '{source}' trained on the whole train split, so a selection split carved from it would score examples "
            "the model was trained on.",
            "score a run that was trained with evaluation.split=selection (a comparison's search runs are), or pick another split.")
    policy, model_source, tokenizer, examples = what_the_export_reads(recipe, source, same_examples_as_the_run=False)
    with reopened_run(source, recipe, policy, model_source, tokenizer, examples) as ctx:
        console.rule(f"[bold]{key}: {len(examples)} examples")
        evaluation = evaluate_with_progress(key, ctx.model, tokenizer, recipe, examples)
        _write_predictions(source / f"predictions_{key}.jsonl", examples, evaluation.predictions)
        record_evaluation(ctx.record, key, evaluation, recipe.recipe.evaluation, changed, policy.device, command)
        save_with_report(ctx)
    print_rouge_table(ctx.record)
    console.print(f"Scores written to {source / 'run.json'} (eval['{key}']) and {source / f'predictions_{key}.jsonl'}")
    return ctx.record.as_json()


def record_evaluation(record, key: str, evaluation, settings, changed: list[str], device: str, command: str | None) -> None:
    """The scores under eval[key], with the settings they were scored with, and the evaluation listed in
    run_info.evaluations_after_run."""
    from peftbench.pipeline.record import EvaluationAfterRun, EvaluationSettings, Scores

    scores = Scores.model_validate(evaluation.as_record())
    scores.settings = EvaluationSettings(**{k: getattr(settings, k) for k in EVALUATION_KEYS})
    record.eval[key] = scores
    data = record.meta_info.dataset_info
    record.run_info.evaluations_after_run.append(EvaluationAfterRun(
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, key=key, overrides=changed,
        device=device, run_split=data.eval_split if data else None))
