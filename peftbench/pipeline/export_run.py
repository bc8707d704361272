"""`peftbench export RUN_DIR`: the exporters on a finished run, on any machine that has the base model.

Train on a GPU, export on a laptop: the run directory holds what the exporters need (recipe.yaml,
the adapter, the HF predictions the GGUF's smoke test is checked against). This module only rebuilds
the run's context from it (the base model with the adapter loaded again, the evaluation examples)
and then calls the runner's own export stage (``runner.export``) with the exporters asked for, so an
export after the run is exactly the export a run does. run.json is reopened, not rewritten: every
field stays, the export stages, files and scores are added or replaced, and each export is listed
in ``run_info.exports_after_run``; report.md is rendered again from it.

Everything the user can get wrong (not a run, an unfinished run, no adapter, a base model or dataset
this machine does not have, an exporter the method cannot feed, an unknown quantisation type) is
found before anything is written.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from peftbench.console import console
from peftbench.errors import PeftbenchError
from peftbench.files import atomic_directory, atomic_write_text
from peftbench.pipeline.environment import cpu_description
from peftbench.pipeline.record import ExportAfterRun, ExportRecord, RunRecord

# Recipe keys that say where things are on this machine, not what was trained: an export on another
# machine may point them elsewhere (`model.name=/models/llama`).
LOCATION_KEYS = ("model.name", "model.gguf_file", "model.revision", "dataset.path")
# Recipe keys that act at export time, not in training: which weights a 4-bit adapter is merged into, and
# how many of the run's evaluation examples the GGUF's smoke test answers (a laptop's budget: the first N).
EXPORT_TIME_KEYS = ("method.merge_into", "evaluation.max_samples")
# What --output-dir copies of the run: what the exporters and the report read, not checkpoints.
COPIED = ("run.json", "recipe.yaml", "report.md", "predictions_*.jsonl", "adapter")


def require_finished_run(run_dir: Path) -> Path:
    from peftbench.pipeline.record import recorded_status

    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise PeftbenchError(f"run directory '{run_dir}' {what}.", "pass the directory `peftbench run` wrote, e.g. runs/quickstart.")
    status = recorded_status(run_dir)
    if status is None:
        raise PeftbenchError(f"'{run_dir}' is not a peftbench run directory (no run.json written by peftbench).",
                             "pass the directory `peftbench run` wrote, e.g. runs/quickstart.")
    if status != "success":
        raise PeftbenchError(f"run '{run_dir}' has not finished (status: {status}); only a finished run's adapter is exported.",
                             "finish it first: `peftbench run RECIPE --output-dir RUN_DIR --resume`.")
    adapter = run_dir / "adapter"
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise PeftbenchError(f"run '{run_dir}' has no trained adapter (adapter/ is missing or empty).",
                             "copy the run directory with its adapter/ folder, or run the recipe again.")
    if not (run_dir / "recipe.yaml").is_file():
        raise PeftbenchError(f"run '{run_dir}' has no recipe.yaml.", "copy the whole run directory, recipe.yaml included.")
    return run_dir


def export_recipe(run_dir: Path, to: list[str], quant_types: list[str] | None, overrides: list[str]):
    """The run's resolved recipe with the exporters asked for: options from the run's recipe where it
    listed the exporter, the smoke test on, --quant-type and NAME.key=value overrides on top; validated
    as `peftbench run` validates (unknown type, a method that cannot merge: one line)."""
    from peftbench.pipeline.recipe import apply_overrides, read_recipe_file, validate_recipe

    raw = read_recipe_file(run_dir / "recipe.yaml")
    previous = {ref.get("name"): ref for ref in raw.get("exporters") or [] if isinstance(ref, dict)}
    exporters = []
    for plugin in exporters_to_run(to, quant_types):
        ref = {**previous.get(plugin.name, {}), "name": plugin.name, **plugin.after_run_options}
        if quant_types and "quant_type" in plugin.Options.model_fields:
            ref["quant_type"] = list(quant_types) if len(quant_types) > 1 else quant_types[0]
        exporters.append(ref)
    raw["exporters"] = exporters
    positions = {ref["name"]: i for i, ref in enumerate(exporters)}
    translated = []
    for override in overrides:
        key, eq, value = override.partition("=")
        head = key.split(".", 1)[0]
        if eq and head in positions and "." in key:
            translated.append(f"exporters.{positions[head]}.{key.split('.', 1)[1]}={value}")
        elif eq and (key in LOCATION_KEYS or key in EXPORT_TIME_KEYS):
            translated.append(override)
        else:
            raise PeftbenchError(
                f"override '{override}' is not one `peftbench export` takes.",
                f"set an exported format's option as NAME.key=value (NAME one of {', '.join(positions)}, e.g. gguf.margin=2), "
                f"or where things are on this machine: {', '.join(k + '=...' for k in LOCATION_KEYS)}, "
                "or for a 4-bit method which weights to merge into: method.merge_into=original|nf4_roundtrip, "
                "or a smoke test on the first N of the run's examples: evaluation.max_samples=N.")
    return validate_recipe(apply_overrides(raw, translated), source=str(run_dir / "recipe.yaml"))


def exporters_to_run(to: list[str] | None, quant_types: list[str] | None) -> list:
    """The exporter plugins `--to` names (default: those that declare ``export_default``), with the exporters
    whose files they read (``after``), in the order given except that each comes after those it reads."""
    from peftbench.errors import did_you_mean
    from peftbench.host import get_host

    registry = get_host().exporters
    names = registry.names()
    unknown = [t for t in to or [] if t not in names]
    if unknown:
        raise PeftbenchError(f"--to {unknown[0]}: not an export target.{did_you_mean(unknown[0], names)}",
                             f"use one or more of: {', '.join(names)}.")
    wanted = list(to or [n for n in names if registry.get(n).export_default])
    for name in wanted:  # grows while it is walked: what each wanted exporter reads is wanted too
        wanted += [n for n in registry.get(name).after if n not in wanted]
    ordered: list[str] = []
    while len(ordered) < len(wanted):
        ordered += [n for n in wanted if n not in ordered
                    and all(a in ordered for a in registry.get(n).after)][:1] or _cycle(wanted, ordered)
    plugins = [registry.get(n) for n in ordered]
    if quant_types and not any("quant_type" in p.Options.model_fields for p in plugins):
        raise PeftbenchError(f"--quant-type, and none of the exporters asked for ({', '.join(ordered)}) takes a "
                             "quantisation type.", "add --to with an exporter that quantises (gguf, or ollama).")
    return plugins


def _cycle(wanted: list[str], ordered: list[str]) -> list[str]:
    raise PeftbenchError(f"exporters {', '.join(n for n in wanted if n not in ordered)} each wait for another's files.",
                         "fix the exporter plugins' `after`.")


def require_new_directory(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PeftbenchError(f"--output-dir '{target}' exists and is not an empty directory.",
                             "pass a new directory, or leave --output-dir out to export into the run directory.")


def copy_run(source: Path, target: Path) -> Path:
    """--output-dir: a new run directory with what the exports read (adapter, recipe, record,
    predictions), written whole or not at all."""
    require_new_directory(target)
    if target.exists():
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        for pattern in COPIED:
            for entry in source.glob(pattern):
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    return target


def export_run(run_dir: str | Path, *, to: list[str] | None = None, quant_types: list[str] | None = None,
               output_dir: str | Path | None = None, overrides: list[str] = (), command: str | None = None) -> dict:
    """Export a finished run; returns its run.json as written (into the run directory or ``output_dir``)."""
    source = require_finished_run(Path(run_dir))
    if output_dir:
        require_new_directory(Path(output_dir))
    recipe = export_recipe(source, list(to) if to else None, quant_types, list(overrides))
    policy, model_source, tokenizer, examples = what_the_export_reads(recipe, source)

    target = copy_run(source, Path(output_dir)) if output_dir else source
    with reopened_run(target, recipe, policy, model_source, tokenizer, examples) as ctx:
        from peftbench.pipeline.runner import export

        export(ctx)
        ctx.record.run_info.exports_after_run.append(export_entry(ctx, command))
        save_with_report(ctx)
    print_export_summary(ctx.record, recipe, target)
    return ctx.record.as_json()


@contextmanager
def reopened_run(run_dir: Path, recipe, policy, model_source: str, tokenizer, examples):
    """A finished run's context, as its run had it, with the run's adapter loaded on the base model
    again; the run directory is held meanwhile (no `peftbench run --overwrite` or second export on it)."""
    from peftbench.library_output import run_log
    from peftbench.pipeline.context import RunContext
    from peftbench.pipeline.record import RunRecorder
    from peftbench.pipeline.runner import claim_run_dir, release_run_dir

    with ExitStack() as on_exit:
        claim_run_dir(run_dir)
        on_exit.callback(release_run_dir, run_dir)
        on_exit.enter_context(run_log(run_dir / "run.log"))  # library output of this command, after the run's
        ctx = RunContext(recipe=recipe, run_dir=run_dir, policy=policy, model_source=model_source, tokenizer=tokenizer,
                         eval_dataset=examples, recorder=RunRecorder.reopen(run_dir))
        with console.status("loading the base model with the run's adapter"):
            ctx.model = recipe.method.load(ctx.load_base_model(), ctx.adapter_dir, recipe.method_options)
        yield ctx


def export_entry(ctx, command: str | None) -> ExportAfterRun:
    """What run_info.exports_after_run records of this export."""
    recipe, policy = ctx.recipe, ctx.policy
    # merge_into only means something where the adapter was trained on a 4-bit base (qlora; ia3 with load_in_4bit)
    trained_on_4bit_base = (hasattr(recipe.method_options, "merge_into")
                            and recipe.method.quantization_config(recipe.method_options, policy) is not None)
    stages = ctx.record.run_info.stages
    return ExportAfterRun(
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
        exporters=recipe.resolved_dict()["exporters"], device=policy.device, cpu=cpu_description(),
        **({"merge_into": recipe.method_options.merge_into} if trained_on_4bit_base else {}),
        smoke_examples=len(ctx.eval_dataset),
        stages={f"export:{p.name}": stages[f"export:{p.name}"].status for p, _ in recipe.exporters},
    )


def save_with_report(ctx) -> None:
    """report.md, then run.json, as a run finishes: a kill in between leaves the old record, whole."""
    from peftbench.pipeline.report import render_run_report

    atomic_write_text(ctx.run_dir / "report.md", render_run_report(ctx.record))
    ctx.recorder.save()


def what_the_export_reads(recipe, run_dir: Path, *, same_examples_as_the_run: bool = True):
    """(device policy, model source, tokenizer, evaluation examples) on this machine: the base model
    and the data the run used, each found (or refused in one line) before anything is written."""
    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_tokenizer, resolve_model_source
    from peftbench.pipeline.runner import evaluation_split

    r = recipe.recipe
    if r.model.trust_remote_code:  # the run was started with model.trust_remote_code=true on its command line
        from peftbench.pipeline.recipe import warn_remote_code

        warn_remote_code(r.model.name)
    import datasets  # noqa: F401  (imported here so that their progress bars are quieted before they run)
    import transformers  # noqa: F401

    from peftbench.library_output import quiet_progress_bars

    quiet_progress_bars()
    policy = resolve_policy(r.model.dtype)
    console.rule("[bold]base model and examples")
    model_source = resolve_model_source(r.model.name, r.model.gguf_file)  # a missing base model: one line, nothing written
    tokenizer = load_tokenizer(model_source, r.model.trust_remote_code, r.model.revision)
    data = recipe.dataset.load(recipe.dataset_options, r.seed)
    _, examples = evaluation_split(r.evaluation, data, policy)
    if same_examples_as_the_run:
        _require_same_examples(run_dir, examples, first_n=r.evaluation.max_samples)
    return policy, model_source, tokenizer, examples


def _require_same_examples(run_dir: Path, examples, first_n: int | None = None) -> None:
    """The smoke test compares the GGUF with the run's HF answers: the dataset here must give the
    examples the run scored (with ``first_n``, an export's evaluation.max_samples, the first of them)."""
    path = run_dir / "predictions_finetuned.jsonl"
    if not path.is_file():
        raise PeftbenchError(f"run '{run_dir}' has no predictions_finetuned.jsonl to check the GGUF against.",
                             "copy the whole run directory, its predictions included.")
    from peftbench.pipeline.evaluation import read_predictions

    scored = read_predictions(path)
    missing = [str(i) for i in examples["id"] if str(i) not in scored]
    if missing or (len(scored) != len(examples) and not (first_n and len(examples) == min(first_n, len(scored)))):
        raise PeftbenchError(
            f"the dataset on this machine does not give the examples run '{run_dir}' scored "
            f"({len(examples)} examples here, {len(scored)} in predictions_finetuned.jsonl"
            + (f"; e.g. '{missing[0]}' is not among them" if missing else "") + ").",
            "point dataset.path=... at the same data the run used (dataset.path is recorded in RUN_DIR/recipe.yaml).")


def print_export_summary(record: RunRecord, recipe, run_dir: Path) -> None:
    from rich.table import Table

    from peftbench.files import human_bytes

    table = Table(title=f"Exports of {run_dir}")
    for col in ("export", "status", "files"):
        table.add_column(col)
    for plugin, _ in recipe.exporters:
        stage = record.run_info.stages.get(f"export:{plugin.name}")
        export = record.exports.get(plugin.name) or ExportRecord()
        files = ", ".join(f"{Path(path).name} ({human_bytes(export.sizes.get(label))})" for label, path in export.files.items())
        status = (stage.status + (f": {stage.error}" if stage.error else "")) if stage else "?"
        table.add_row(plugin.name, status, files)
    console.print(table)
    from peftbench.pipeline.report import print_plugin_summaries

    print_plugin_summaries(record)
    console.print(f"Recorded in [bold]{run_dir / 'run.json'}[/] and report.md")


def exit_code(record: dict) -> int:
    """0 when every export stage of the last export succeeded, 1 when one failed or was refused."""
    stages = record["run_info"]["exports_after_run"][-1]["stages"]
    return 0 if all(status == "success" for status in stages.values()) else 1
