"""Running a planned comparison: each run in its own process (so peak memory and a crash belong to
that run alone) into ``<output_dir>/<run name>/``, past failures, then the report. With a search, the
search runs go first and decide which runs follow. ``jobs`` runs several at once: a small model leaves
a large GPU mostly idle, so side-by-side runs cost little more time than one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from peftbench.compare.plan import Comparison, PlannedRun, choose, extend_search
from peftbench.compare.report import write_report
from peftbench.console import console
from peftbench.errors import ERROR_FILE_ENV, PeftbenchError
from peftbench.files import atomic_write_json, atomic_write_text
from peftbench.pipeline.device import RUNS_SHARING_GPU_ENV, nvidia_mps_running
from peftbench.pipeline.record import RECORD_FILE, ComparisonPlace, RunRecord, read_record, recorded_status


def check_run_dirs(comparison: Comparison, *, resume: bool, overwrite: bool) -> None:
    """Refuse up front, naming every run directory in the way, rather than failing run by run."""
    if resume or overwrite:
        return
    taken = [r.name for r in comparison.all_runs() if (d := comparison.output_dir / r.name).is_dir() and any(d.iterdir())]
    if taken:
        raise PeftbenchError(
            f"run directories under '{comparison.output_dir}' already hold runs: {', '.join(taken)}.",
            "pass --resume to keep finished runs and continue the others, --overwrite to start again, "
            "or --output-dir DIR for a new comparison.",
        )


def run_comparison(comparison: Comparison, *, resume: bool = False, overwrite: bool = False, command: str = "",
                   child_args: list[str] = (), jobs: int = 1, search_only: bool = False) -> list[dict]:
    """Run every planned run (each in its own process, ``jobs`` at a time), go on past failures, then
    write the report. ``child_args`` are passed on to each run's ``peftbench run`` (e.g. --num-processes).
    ``search_only``: stop after the search phase (the finals follow with ``resume``, which keeps the
    finished search runs: a search and its finals can then go in two sittings of a lent GPU)."""
    if jobs < 1:
        raise PeftbenchError(f"--jobs {jobs} is not a number of runs.", "pass 1 or more.")
    if search_only and not comparison.search:
        raise PeftbenchError("--search-only, and this comparison has no search.", "drop --search-only, or add search: to the recipe.")
    check_run_dirs(comparison, resume=resume, overwrite=overwrite)
    if jobs > 1 and shutil.which("nvidia-smi") and not nvidia_mps_running():
        console.print(f"[yellow]note:[/] the {jobs} runs will take turns on the GPU in time slices. NVIDIA MPS lets their "
                      "kernels run at the same time: start it first with `nvidia-cuda-mps-control -d` (README: Comparing methods).")
    runner = _Runner(comparison, resume=resume, overwrite=overwrite, child_args=list(child_args), jobs=jobs)
    done = runner.run_all(comparison.runs, "search run" if comparison.search else "comparison run")
    if comparison.search:
        done.update(_search_past_edges(comparison, runner, done))
        finals, lines = choose(comparison, {run.name: record for run, record in done.items()})
        console.rule("[bold]settings chosen on the " + comparison.search.split + " split")
        for line in lines:
            console.print(line)
        if search_only:
            console.print(f"Search done; the {len(finals)} final runs and the report follow with the same command and --resume.")
            return [record.as_json() for record in done.values()]
        done.update(runner.run_all(finals, "final run"))
    write_report([comparison.output_dir / run.name for run in done], comparison.report_path, command=command)
    failed = [run.name for run, record in done.items() if record.run_info.status != "success"]
    console.print(f"Report written to [bold]{comparison.report_path}[/]"
                  + (f"; [red]{len(failed)} failed:[/] {', '.join(failed)}" if failed else ""))
    return [record.as_json() for record in done.values()]


def _search_past_edges(comparison: Comparison, runner: "_Runner", done: dict) -> dict:
    """While an entry's best point lies on its grid's edge (and ``search.extend`` allows), search one step past it."""
    extra: dict = {}
    noted: set[str] = set()
    while True:
        more, notes = extend_search(comparison, {run.name: record for run, record in {**done, **extra}.items()})
        for note in dict.fromkeys(notes).keys() - noted:
            console.print(f"[yellow]note:[/] {note}")
            noted.add(note)
        if not more:
            return extra
        for run in more:
            console.print(f"{run.label}: the best point so far lies on the grid's edge; searching {run.config}")
        extra.update(runner.run_all(more, "search run past the grid's edge"))


class _Runner:
    def __init__(self, comparison: Comparison, *, resume: bool, overwrite: bool, child_args: list[str], jobs: int):
        self.comparison, self.resume, self.overwrite = comparison, resume, overwrite
        self.child_args, self.jobs = child_args, jobs
        self.recipes_dir = comparison.output_dir / "recipes"

    def run_all(self, runs: list[PlannedRun], what: str) -> dict[PlannedRun, RunRecord]:
        """Each run's record, in the planned order."""
        if self.jobs == 1:
            return {run: self.run_one(run, f"{what} {i}/{len(runs)}") for i, run in enumerate(runs, 1)}
        console.rule(f"[bold]{len(runs)} {what}s, {min(self.jobs, len(runs))} at a time")
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:  # threads only wait on child processes
            records = pool.map(lambda pair: self.run_one(pair[1], f"{what} {pair[0]}/{len(runs)}"), enumerate(runs, 1))
            return dict(zip(runs, records))

    def run_one(self, run: PlannedRun, title: str) -> RunRecord:
        run_dir = self.comparison.output_dir / run.name
        parallel = self.jobs > 1
        if not parallel:
            console.rule(f"[bold]{title}: {run.name}")
        for note in run.notes:
            console.print(f"[yellow]note:[/] {run.name}: {note}")
        existing = recorded_status(run_dir)
        if self.resume and existing == "success":
            console.print(f"{run.name}: finished earlier, kept")
            return _annotate(run_dir, run, None)
        recipe_path = self.recipes_dir / f"{run.name}.yaml"
        atomic_write_text(recipe_path, yaml.safe_dump(run.raw, sort_keys=False))
        flag = ["--overwrite"] if self.overwrite else ["--resume"] if self.resume and existing else []
        cmd = [sys.executable, "-m", "peftbench", "run", str(recipe_path), "--output-dir", str(run_dir), *flag, *self.child_args]
        error_file = self.recipes_dir / f"{run.name}.error"
        error_file.unlink(missing_ok=True)
        env = {**os.environ, ERROR_FILE_ENV: str(error_file)}
        if parallel:  # each run plans its GPU memory for its share of the device
            env[RUNS_SHARING_GPU_ENV] = str(self.jobs)
            # ... and its share of the CPUs: torch's CPU ops and, with trainer.compile, inductor's compile
            # workers otherwise each take every CPU in every run (N runs x all CPUs threads or processes).
            share = str(max(1, (os.cpu_count() or 1) // self.jobs))
            env.setdefault("OMP_NUM_THREADS", share)
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)
        if parallel:  # interleaved progress bars would be unreadable: each run's output goes to its own file
            console.print(f"{title}: {run.name} started (output: {self.recipes_dir / (run.name + '.out')})")
            with open(self.recipes_dir / f"{run.name}.out", "w", encoding="utf-8") as out:
                returncode = subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        else:
            returncode = subprocess.call(cmd, env=env)
        record = _annotate(run_dir, run, error_file)
        if returncode != 0:
            console.print(f"[red]{run.name} failed[/] (exit code {returncode}): "
                          f"{record.run_info.error_msg or 'see its output'}; the comparison goes on")
        elif parallel:
            console.print(f"{run.name} finished")
        return record


def _annotate(run_dir: Path, run: PlannedRun, error_file: Path | None) -> RunRecord:
    """Record the run's place in the comparison in its run.json; a run that died before writing one
    (killed, or refused at start) gets a failed record so the report still shows it."""
    path = run_dir / RECORD_FILE
    if path.is_file():
        record = read_record(path)
    else:
        record = RunRecord.new(run.raw, experiment_name=run.name)
        record.train_info.status = "failed"
        error = error_file.read_text(encoding="utf-8") if error_file and error_file.is_file() else \
            "the run ended before writing run.json (see its output above)"
        record.run_info.status, record.run_info.error_msg = "failed", error
    record.run_info.comparison = ComparisonPlace.model_validate(run.annotation())
    atomic_write_json(path, record.as_json())
    return record
