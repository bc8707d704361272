"""Running a planned comparison: each run in its own process (so peak memory and a crash belong to
that run alone) into ``<output_dir>/<run name>/``, past failures, then the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from peftbench.compare.plan import Comparison, PlannedRun
from peftbench.compare.report import write_report
from peftbench.console import console
from peftbench.errors import ERROR_FILE_ENV, PeftbenchError
from peftbench.files import atomic_write_json, atomic_write_text, read_json
from peftbench.pipeline.record import new_record, recorded_status


def check_run_dirs(comparison: Comparison, *, resume: bool, overwrite: bool) -> None:
    """Refuse up front, naming every run directory in the way, rather than failing run by run."""
    if resume or overwrite:
        return
    taken = [r.name for r in comparison.runs if (d := comparison.output_dir / r.name).is_dir() and any(d.iterdir())]
    if taken:
        raise PeftbenchError(
            f"run directories under '{comparison.output_dir}' already hold runs: {', '.join(taken)}.",
            "pass --resume to keep finished runs and continue the others, --overwrite to start again, "
            "or --output-dir DIR for a new comparison.",
        )


def run_comparison(comparison: Comparison, *, resume: bool = False, overwrite: bool = False, command: str = "",
                   child_args: list[str] = ()) -> list[dict]:
    """Run every planned run (each in its own process), go on past failures, then write the report.
    ``child_args`` are passed on to each run's ``peftbench run`` (e.g. --num-processes)."""
    check_run_dirs(comparison, resume=resume, overwrite=overwrite)
    recipes_dir = comparison.output_dir / "recipes"
    records = []
    for i, run in enumerate(comparison.runs, 1):
        run_dir = comparison.output_dir / run.name
        console.rule(f"[bold]comparison run {i}/{len(comparison.runs)}: {run.name}")
        for note in run.notes:
            console.print(f"[yellow]note:[/] {note}")
        existing = recorded_status(run_dir)
        if resume and existing == "success":
            console.print(f"{run.name}: finished earlier, kept")
        else:
            recipe_path = recipes_dir / f"{run.name}.yaml"
            atomic_write_text(recipe_path, yaml.safe_dump(run.raw, sort_keys=False))
            flag = ["--overwrite"] if overwrite else ["--resume"] if resume and existing else []
            cmd = [sys.executable, "-m", "peftbench", "run", str(recipe_path), "--output-dir", str(run_dir), *flag, *child_args]
            error_file = recipes_dir / f"{run.name}.error"
            error_file.unlink(missing_ok=True)
            returncode = subprocess.call(cmd, env={**os.environ, ERROR_FILE_ENV: str(error_file)})
            if returncode != 0:
                console.print(f"[red]{run.name} failed[/] (exit code {returncode}); the comparison goes on")
        records.append(_annotate(run_dir, run, recipes_dir / f"{run.name}.error"))

    write_report([comparison.output_dir / r.name for r in comparison.runs], comparison.report_path, command=command)
    failed = [r["run_info"]["experiment_name"] for r in records if r["run_info"]["status"] != "success"]
    console.print(f"Report written to [bold]{comparison.report_path}[/]"
                  + (f"; [red]{len(failed)} failed:[/] {', '.join(failed)}" if failed else ""))
    return records


def _annotate(run_dir: Path, run: PlannedRun, error_file: Path) -> dict:
    """Record the run's place in the comparison in its run.json; a run that died before writing one
    (killed, or refused at start) gets a failed record so the report still shows it."""
    path = run_dir / "run.json"
    if path.is_file():
        record = read_json(path)
    else:
        record = new_record(run.raw, experiment_name=run.name)
        record["train_info"]["status"] = "failed"
        error = error_file.read_text(encoding="utf-8") if error_file.is_file() else \
            "the run ended before writing run.json (see its output above)"
        record["run_info"].update(status="failed", error_msg=error)
    record["run_info"]["comparison"] = run.annotation()
    atomic_write_json(path, record)
    return record
