"""Comparison reports over many runs: one Markdown table row per method (configuration), PNG plots beside it.

``peftbench report RUN_DIR... -o reports/NAME.md`` reads each run's run.json (a run directory, or a
folder holding run directories), groups the seeds of one configuration (mean ± standard deviation),
marks the best value of each column in bold and writes ``NAME_*.png`` plots next to the Markdown.
The same records always give byte-identical Markdown: rows are sorted and nothing in it comes from
the clock or from where the runs lie on disk.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from peftbench.errors import PeftbenchError
from peftbench.compare.paired import BOOTSTRAP_SEED, against, seed_scores
from peftbench.compare.significance import CONFIDENCE, RESAMPLES, PairedDifference
from peftbench.files import atomic_write_text, human_bytes
from peftbench.pipeline.environment import versions
from peftbench.pipeline.evaluation import ROUGE_CONVENTION, ROUGE_TYPES
from peftbench.pipeline.record import (ChosenBy, ComparisonPlace, DatasetInfo, RunRecord, Scores, first_non_finite,
                                       read_record)

ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


# --- loading -------------------------------------------------------------------------------------


@dataclass
class Run:
    record: RunRecord
    directory: Path | None = None  # where run.json lies (its predictions beside it); None for a record in memory

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def status(self) -> str:
        return self.record.run_info.status

    @property
    def ok(self) -> bool:
        return self.status == "success" and "finetuned" in self.record.eval and self.divergence is None

    @property
    def divergence(self) -> str | None:
        """Where training went non-finite, for records written before the trainer refused such runs."""
        found = first_non_finite(self.record.train_info.metrics)
        return f"{found[0]} {found[1]} at step {found[2]}" if found else None

    @property
    def annotation(self) -> ComparisonPlace | None:
        """The run's place in a comparison; None for a run made on its own (or stopped before the
        comparison recorded it)."""
        return self.record.run_info.comparison

    @property
    def method(self) -> str:
        return self.record.run_info.recipe.method.name or "?"

    @property
    def config(self) -> str | None:
        return self.annotation.config if self.annotation else None

    @property
    def entry_label(self) -> str:
        """The comparison entry this run belongs to (its label, by default the method name)."""
        return self.annotation.label if self.annotation else self.method

    @property
    def grid(self) -> dict[str, Any]:
        return self.annotation.grid if self.annotation else {}

    @property
    def phase(self) -> str:
        return self.annotation.phase if self.annotation else "final"

    @property
    def chosen_by(self) -> ChosenBy | None:
        return self.annotation.chosen_by if self.annotation else None

    @property
    def finetuned(self) -> Scores | None:
        return self.record.eval.get("finetuned")


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path is a run directory (holds run.json) or a folder searched for run directories."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "run.json").is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(p.parent for p in path.rglob("run.json"))
            if not inside:
                raise PeftbenchError(f"no run.json under '{path}'.", "pass run directories or folders that hold them.")
            found += inside
        else:
            raise PeftbenchError(f"'{path}' is not a run directory.", "pass run directories (each holds a run.json) or their parent.")
    return list(dict.fromkeys(found))


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = []
    for run_dir in find_run_dirs(paths):
        try:
            runs.append(Run(read_record(run_dir), run_dir))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise PeftbenchError(f"'{run_dir / 'run.json'}' is not a peftbench run record ({where}: {first['msg']}).",
                                 "pass directories written by `peftbench run`.") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a mapping
            raise PeftbenchError(f"'{run_dir / 'run.json'}' is not a peftbench run record ({e}).",
                                 "pass directories written by `peftbench run`.") from None
    return runs


# --- grouping and statistics ---------------------------------------------------------------------


@dataclass
class Stat:
    mean: float
    std: float | None  # None with a single run
    n: int


@dataclass
class Group:
    """One configuration (method, options, grid point), with one run per seed."""

    key: str
    label: str
    method: str
    grid: dict
    runs: list[Run]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.ok and not _unfinished(r)]

    @property
    def unfinished_runs(self) -> list[Run]:
        return [r for r in self.runs if _unfinished(r)]


def _unfinished(run: Run) -> bool:
    """Stopped before it ended (killed, machine given back): not a failure of the method."""
    return not run.ok and run.status in ("running", "interrupted")


def _config_key(run: Run) -> str:
    if run.config:
        return "config:" + run.config
    recipe = run.record.run_info.recipe.as_json()
    recipe.pop("seed", None)
    recipe.pop("output_dir", None)
    return "recipe:" + json.dumps(recipe, sort_keys=True)


def group_runs(runs: list[Run]) -> list[Group]:
    by_key: dict[str, list[Run]] = {}
    configs = {run.config for run in runs if run.config}
    for run in runs:
        key = _config_key(run)
        # A comparison annotates each run when it ends: a run stopped part-way (its machine given back)
        # has no annotation, and joins its configuration's group by name instead of posing as another one.
        unfinished_of = _without_seed(run.name)
        if not run.annotation and unfinished_of != run.name and unfinished_of in configs:
            key = "config:" + unfinished_of
        by_key.setdefault(key, []).append(run)
    groups = []
    for key, members in by_key.items():
        members.sort(key=lambda r: (_seed(r), r.name))
        first = next((r for r in members if r.annotation), members[0])
        groups.append(Group(key=key, label=run_label(first), method=first.method, grid=first.grid, runs=members))
    groups.sort(key=lambda g: (g.label, g.method, g.key))
    seen: dict[str, int] = {}
    for g in groups:  # two configurations from differently named folders may share a name
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label = f"{g.label} #{seen[g.label]}"
    for g in groups:
        g.stats = _stats([run_metrics(r.record) for r in g.ok_runs])
    return groups


def run_label(run: Run) -> str:
    """The configuration a run belongs to, as a reader says it: a comparison's entry and grid point
    (``lora lr=6e-3 all-linear``); for a run made on its own, its directory's name without the seed."""
    if run.annotation:
        return config_label(run.entry_label, run.grid)
    return _without_seed(run.name)


# How a grid key shows in a label: a short name, or none where the value says what it is.
GRID_KEY_NAMES = {"trainer.learning_rate": "lr", "method.target_modules": ""}


def config_label(label: str, grid: dict[str, Any]) -> str:
    """``lora`` with {trainer.learning_rate: 0.006, method.target_modules: all-linear} -> ``lora lr=6e-3 all-linear``."""
    parts = [label]
    for key, value in grid.items():
        name = GRID_KEY_NAMES.get(key, key.rpartition(".")[2])
        parts.append(f"{name}={_short(value)}" if name else _short(value))
    return " ".join(parts)


def _short(value: Any) -> str:
    """A grid value in few characters: small numbers in powers of ten (6e-3), lists joined by commas."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(_short, value))
    if isinstance(value, float) and 0 < abs(value) < 0.1:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)


def _without_seed(name: str) -> str:
    """A run's name without the comparison's "-seedN" suffix: its configuration's name."""
    return re.sub(r"-seed\d+$", "", name)


def _seed(run: Run) -> int:
    seed = run.annotation.seed if run.annotation else run.record.run_info.recipe.seed
    return seed if isinstance(seed, int) else 0


def run_metrics(record: RunRecord) -> dict[str, float]:
    """The numbers a report compares, from one run record (missing ones left out)."""
    train, tuned, base = record.train_info, record.eval.get("finetuned"), record.eval.get("baseline")
    out = {
        "trainable": train.num_trainable_params,
        "trainable_percent": train.trainable_percent,
        "adapter_bytes": train.file_size,
        "train_time": train.train_time,
        "tokens_per_second": train.tokens_per_second,
        "peak_memory": train.accelerator_memory_max,
        "eval_time": tuned.eval_time_s if tuned else None,
        "forgetting_change": record.forgetting.change if record.forgetting is not None else None,
    }
    for key in ROUGE_TYPES:
        out[key] = tuned.rouge(key) if tuned else None
        out[f"base_{key}"] = base.rouge(key) if base else None
        if tuned and base:
            out[f"delta_{key}"] = tuned.rouge(key) - base.rouge(key)
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def _stats(metric_rows: list[dict[str, float]]) -> dict[str, Stat]:
    keys = sorted({k for row in metric_rows for k in row})
    out = {}
    for key in keys:
        values = [row[key] for row in metric_rows if key in row]
        out[key] = Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))
    return out


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # the statistic that decides "best"
    better: str  # "max" or "min"
    text: Callable[[Group], str]  # the cell, from the group's statistics
    best_text: Callable[[Stat], str]  # what must equal the best for a cell to be bold


def _num(fmt: str) -> Callable[[Stat], str]:
    return lambda s: format(s.mean, fmt)


def _spread(stat: Stat, fmt: str) -> str:
    return format(stat.mean, fmt) + (f" ± {format(stat.std, fmt)}" if stat.std is not None else "")


def _rouge_cell(key: str) -> Callable[[Group], str]:
    def cell(g: Group) -> str:
        delta = g.stats.get(f"delta_{key}")
        return _spread(g.stats[key], ".2f") + (f" ({delta.mean:+.2f})" if delta else "")
    return cell


def _columns() -> list[Column]:
    cols = [
        Column("trainable params", "trainable", "min",
               lambda g: f"{g.stats['trainable'].mean:,.0f} ({g.stats['trainable_percent'].mean:.3f}%)"
               if "trainable_percent" in g.stats else f"{g.stats['trainable'].mean:,.0f}", _num(",.0f")),
        Column("adapter size", "adapter_bytes", "min", lambda g: human_bytes(g.stats["adapter_bytes"].mean),
               lambda s: human_bytes(s.mean)),
    ]
    cols += [Column(f"{ROUGE_NAMES[k]} (Δ base)", k, "max", _rouge_cell(k), _num(".2f")) for k in ROUGE_TYPES]
    cols += [
        Column("train time", "train_time", "min", lambda g: _spread(g.stats["train_time"], ".1f") + " s", _num(".1f")),
        Column("non-pad tokens/s", "tokens_per_second", "max", lambda g: _spread(g.stats["tokens_per_second"], ",.0f"),
               _num(",.0f")),
        Column("peak memory", "peak_memory", "min", lambda g: human_bytes(g.stats["peak_memory"].mean),
               lambda s: human_bytes(s.mean)),
        Column("eval time", "eval_time", "min", lambda g: _spread(g.stats["eval_time"], ".1f") + " s", _num(".1f")),
    ]
    return cols


FORGETTING_COLUMN = Column("general-text loss change", "forgetting_change", "min",
                           lambda g: _signed_spread(g.stats["forgetting_change"]), _num("+.4f"))


def _signed_spread(stat: Stat) -> str:
    return format(stat.mean, "+.4f") + (f" ± {stat.std:.4f}" if stat.std is not None else "")


def _columns_for(groups: list[Group]) -> list[Column]:
    """The table's columns; the forgetting probe's only when some run recorded its change."""
    cols = _columns()
    if any("forgetting_change" in g.stats for g in groups):
        cols.append(FORGETTING_COLUMN)
    return cols


def _table(groups: list[Group], columns: list[Column]) -> list[str]:
    best: dict[str, str] = {}
    for col in columns:
        stats = [g.stats[col.key] for g in groups if g.ok_runs and col.key in g.stats]
        if len(stats) > 1:  # a lone value is not "best" of anything
            pick = max if col.better == "max" else min
            best[col.key] = col.best_text(pick(stats, key=lambda s: s.mean))
    lines = ["| method | " + " | ".join(c.header for c in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    baseline = _baseline_row(groups)
    if baseline:
        lines.append("| base model (no training) | " + " | ".join(baseline.get(c.key, "—") for c in columns) + " |")
    for g in groups:
        label = g.label
        if g.ok_runs and len(g.runs) > 1:
            extra = ([f"{len(g.failed_runs)} failed"] if g.failed_runs else []) \
                + ([f"{len(g.unfinished_runs)} did not finish"] if g.unfinished_runs else [])
            label += f" ({len(g.ok_runs)} seed{'s' if len(g.ok_runs) > 1 else ''}" + "".join(", " + e for e in extra) + ")"
        if not g.ok_runs:
            verdict = "**failed**" if g.failed_runs else "did not finish"
            lines.append(f"| {label} — {verdict} | " + " | ".join("—" for _ in columns) + " |")
            continue
        cells = []
        for col in columns:
            if col.key not in g.stats:
                cells.append("—")
                continue
            text = col.text(g)
            cells.append(f"**{text}**" if col.best_text(g.stats[col.key]) == best.get(col.key) else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _baseline_row(groups: list[Group]) -> dict[str, str]:
    rows = [run_metrics(r.record) for g in groups for r in g.ok_runs]
    stats = _stats([{k.removeprefix("base_"): v for k, v in row.items() if k.startswith("base_")} for row in rows])
    # Every run scores the same base model on the same examples, so one value is expected; a spread
    # would mean the runs were not scored alike (the notes say so too).
    return {k: _spread(stats[k], ".2f") if stats[k].std else f"{stats[k].mean:.2f}" for k in ROUGE_TYPES if k in stats}


def _ranking(groups: list[Group]) -> list[str]:
    """Configurations by mean ROUGE-1, each after the first against the best: a paired bootstrap over
    examples and seeds where every run has its predictions, else the seeds' spread (and a note says so)."""
    ranked = sorted((g for g in groups if "rouge1" in g.stats), key=lambda g: (-round(g.stats["rouge1"].mean, 4), g.label))
    scores = {g.key: seed_scores([r.directory for r in g.ok_runs]) for g in ranked}
    lines = ["| rank | configuration | grid | ROUGE-1 | Δ base | against the best |", "| ---: | --- | --- | ---: | ---: | --- |"]
    fallback = []
    for i, g in enumerate(ranked, 1):
        grid = ", ".join(f"{k}={v}" for k, v in g.grid.items()) or "—"
        delta = g.stats.get("delta_rouge1")
        paired = None
        if g is not ranked[0] and scores[g.key] and scores[ranked[0].key]:
            paired = against(scores[g.key], scores[ranked[0].key])
        if g is not ranked[0] and paired is None:
            fallback.append(g.label)
        verdict = _paired_verdict(paired) if paired else _against_best(g, ranked[0])
        lines.append(f"| {i} | {g.label} | {grid} | {_spread(g.stats['rouge1'], '.2f')} | "
                     + (f"{delta.mean:+.2f}" if delta else "—") + f" | {verdict} |")
    notes = _ranking_notes(len(ranked) - 1 - len(fallback), fallback)
    return lines + ([""] + notes if notes else [])


def _paired_verdict(paired: PairedDifference) -> str:
    return f"{paired.describe()}, " + ("tie (interval covers 0)" if paired.tie else
                                       "worse (interval excludes 0)" if paired.high < 0 else "better (interval excludes 0)")


def _ranking_notes(paired: int, fallback: list[str]) -> list[str]:
    """Under the ranking table: how each kind of verdict was reached."""
    lines = []
    if paired:
        lines.append(f"Paired: the difference to the best in ROUGE-1 points with its {CONFIDENCE:.0%} paired bootstrap "
                     f"interval ({RESAMPLES} resamples, seed {BOOTSTRAP_SEED}) over the examples both answered (per-example "
                     "ROUGE-1 F from each run's predictions_finetuned.jsonl) and each configuration's seeds; a tie only "
                     "where the interval covers 0.")
    if fallback and paired:
        lines.append("Without predictions files for every run (" + ", ".join(fallback) + "): the seeds' spread rule above.")
    elif fallback:
        lines.append("No predictions files (predictions_finetuned.jsonl) for these runs: the seeds' spread rule above, "
                     "not a paired interval over examples.")
    return lines


def _against_best(group: Group, best: Group) -> str:
    """A difference smaller than the spread of a difference between two runs (the two configurations'
    standard deviations combined) is not evidence that one setting is better: called a tie."""
    if group is best:
        return "best"
    a, b = group.stats["rouge1"], best.stats["rouge1"]
    gap = b.mean - a.mean
    if a.std is None or b.std is None:
        return f"{-gap:+.2f} (one seed: no spread to judge)"
    spread = (a.std ** 2 + b.std ** 2) ** 0.5
    return f"{-gap:+.2f}, tie (within ±{spread:.2f})" if gap <= spread else f"{-gap:+.2f}, worse (beyond ±{spread:.2f})"


def _search(search_runs: list[Run], final_runs: list[Run]) -> list[str]:
    """Every searched grid point with its score on the search split; the one chosen in bold; the points the
    search added past the grid's edge marked with their step (1: the first point past it)."""
    by = [r.chosen_by for r in final_runs if r.chosen_by]
    metric = by[0].metric if by else "rouge1"
    chosen = {r.config for r in final_runs if r.chosen_by}
    split = by[0].split if by else "search"
    lines = [f"| method | setting | {ROUGE_NAMES.get(metric, metric)} on {split} | |", "| --- | --- | ---: | --- |"]
    for run in sorted(search_runs, key=lambda r: (r.entry_label if r.annotation else "", _grid_sort_key(r))):
        grid = ", ".join(f"{k}={v}" for k, v in run.grid.items()) or "—"
        score = f"{run.finetuned.rouge(metric):.2f}" if run.ok else "failed"
        past = f"past the grid's edge ({run.annotation.extension})" if run.annotation and run.annotation.extension else ""
        lines.append(f"| {run.entry_label} | {grid} | "
                     + (f"**{score}** | {'; '.join(filter(None, ['chosen', past]))} |" if run.config in chosen
                        else f"{score} |{' ' + past if past else ''} |"))
    return lines


def _grid_edges(search_runs: list[Run], final_runs: list[Run]) -> list[str]:
    """A line for each chosen setting at the end of a numeric grid (the largest or smallest learning
    rate searched): the best may lie beyond what was searched, and the grid should be widened."""
    chosen = {r.config for r in final_runs if r.chosen_by}
    lines = []
    for label in sorted({r.entry_label for r in search_runs}):
        runs = [r for r in search_runs if r.entry_label == label]
        picked = next((r for r in runs if r.config in chosen), None)
        scored = [r for r in runs if r.ok]
        if picked is None and scored:  # finals not run yet: the best search point is the one they would train
            picked = max(scored, key=lambda r: r.finetuned.rouge1)
        if picked is None:
            continue
        for key, value in picked.grid.items():
            values = [r.grid.get(key) for r in runs]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or len(set(values)) < 3:
                continue  # target modules and the like have no order
            if value in (max(values), min(values)):
                end = "largest" if value == max(values) else "smallest"
                lines.append(f"- {label}: the chosen {key}={value} is the {end} searched; the best may lie beyond the grid.")
    return lines


def _search_budget(search_runs: list[Run], final_runs: list[Run]) -> list[str]:
    """A sentence when the search trained for fewer steps than the results (``search.max_steps``)."""
    def steps(runs: list[Run]) -> str:
        found = sorted({r.record.train_info.steps for r in runs if r.ok} - {None})
        return "/".join(map(str, found)) or "?"

    searched = sorted({r.record.run_info.recipe.trainer.max_steps for r in search_runs} - {None})
    finals = [r for r in final_runs if r.chosen_by]
    if not searched or not finals or steps(search_runs) == steps(finals):
        return []
    return [f"The search trained each point for {steps(search_runs)} optimiser steps (`search.max_steps`), the runs above for "
            f"{steps(finals)}: a short-horizon search, which can favour a higher learning rate than the full run's best."]


def _grid_sort_key(run: Run) -> tuple:
    return tuple((k, v if isinstance(v, (int, float)) else 0, str(v)) for k, v in sorted(run.grid.items()))


def _settings(groups: list[Group]) -> list[str]:
    lines = ["| method | options | learning rate |", "| --- | --- | ---: |"]
    for g in groups:
        recipe = g.runs[0].record.run_info.recipe
        options = ", ".join(f"{k}={_compact(v)}" for k, v in recipe.method.options.items())
        lr = recipe.trainer.learning_rate
        lines.append(f"| {g.label} | {recipe.method.name or g.method}: {options or 'defaults'} | {lr if lr is not None else '—'} |")
    return lines


def _compact(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _setup(runs: list[Run]) -> list[str]:
    ok = [r for r in runs if r.ok] or runs
    first = ok[0].record
    data = first.meta_info.dataset_info or DatasetInfo()
    trainer = first.run_info.recipe.trainer
    seeds = sorted({_seed(r) for r in runs})
    steps = sorted({r.record.train_info.steps for r in ok} - {None})
    budget = f"max_steps {trainer.max_steps}" if trainer.max_steps else f"{_known(trainer.epochs)} epochs"
    return [
        f"- Model: `{first.model_name}`; dataset: `{_known(data.name)}`, "
        f"scored on the {_known(data.eval_split)} split ({_known(data.eval_rows)} examples) with {_decoding(first)}.",
        f"- Training: {budget}, batch {_known(trainer.batch_size)} × {_known(trainer.grad_accum)} accumulation "
        f"({', '.join(map(str, steps)) or '?'} optimiser steps); seeds: {', '.join(map(str, seeds))}.",
    ]


def _known(value) -> str:
    return "?" if value is None else str(value)


def _decoding(record: RunRecord) -> str:
    beams = record.run_info.recipe.evaluation.num_beams or 1
    return "greedy decoding" if beams == 1 else f"beam search ({beams} beams)"


def _environment(runs: list[Run]) -> list[str]:
    lines = []
    described: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        meta, system = run.record.meta_info, run.record.meta_info.system_info
        if system is None:  # a run that died before it started
            continue
        side = f", {system.runs_side_by_side} runs side by side" if system.runs_side_by_side else ""
        text = (f"{system.accelerator or system.device or '?'} ({_known(system.compute_dtype)}{side}, {system.cpu}, "
                f"{_known(system.system)} {system.machine or ''}".rstrip() + f"), Python {_known(system.python)}; "
                + ", ".join(f"{k} {v}" for k, v in versions(meta.package_info).items()))
        described.setdefault(text, []).append(run.name)
    for text, names in described.items():
        lines.append(f"- {text}" + (f" (runs: {', '.join(names)})" if len(described) > 1 else ""))
    return lines


def _plugin_sections(runs: list[Run]) -> list[str]:
    """Sections plugins add (``peftbench_comparison_report_sections``, given the runs' typed records), after
    the table of methods."""
    from peftbench.host import get_host

    records = [run.record for run in runs]
    return [line for lines in get_host().pm.hook.peftbench_comparison_report_sections(records=records) for line in lines]


def _notes(groups: list[Group]) -> list[str]:
    notes = {note for g in groups for run in g.runs for note in _run_notes(run)}
    notes.update(_sharing_notes(groups) + _base_model_notes(groups))
    return sorted(notes)


def _run_notes(run: Run) -> list[str]:
    """What a reader of the table should know about one run: the comparison's notes, a failed stage
    of a run that still counts, a resumed run's unknown speed, why a run is not in the table."""
    notes = [f"{run.name}: {note}" for note in (run.annotation.notes if run.annotation else [])]
    info = run.record.run_info
    if run.ok:  # a failed export leaves the run's scores standing: say which
        notes += [f"{run.name}: stage {name} failed: {stage.error or 'no error recorded'}"
                  for name, stage in info.stages.items() if stage.status == "failed"]
    resumed = run.record.train_info.resumed_from_step
    if resumed is not None:
        notes.append(f"{run.name} was resumed from step {resumed}: its train time, tokens/s and peak memory are unknown")
    if run.divergence:
        notes.append(f"{run.name} diverged: {run.divergence}; its adapter is not usable")
    elif not run.ok:
        status = "failed" if info.status == "failed" else f"did not finish ({info.status})"
        notes.append(f"{run.name} {status}: {info.error_msg or 'no error recorded'}")
    return notes


def _sharing_notes(groups: list[Group]) -> list[str]:
    sharing: dict[int, list[str]] = {}
    for g in groups:
        systems = [r.record.meta_info.system_info for r in g.ok_runs]
        for count in {(s.runs_side_by_side if s else None) or 1 for s in systems}:
            sharing.setdefault(count, []).append(g.label)
    if len(sharing) <= 1:
        return []
    # Runs side by side share one GPU's time: their speed columns depend on how many shared it.
    shared = "; ".join(f"{count} at once: {', '.join(labels)}" for count, labels in sorted(sharing.items()))
    return [f"train time, non-pad tokens/s and eval time were measured with different numbers of runs sharing "
            f"the device ({shared}): compare them only between rows measured alike"]


def _base_model_notes(groups: list[Group]) -> list[str]:
    base = {r.name: v for g in groups for r in g.ok_runs if (v := run_metrics(r.record).get("base_rouge1")) is not None}
    if len({round(v, 2) for v in base.values()}) <= 1:
        return []
    # Same examples, different base numbers: a 4-bit base (QLoRA) is scored as it is loaded, and
    # batched bf16 generation on a GPU is not bit-exact from one run to the next.
    per_run = ", ".join(f"{name} {value:.2f}" for name, value in base.items())
    return [f"the base model's ROUGE-1 differs between runs ({per_run}): each run scores the base it "
            "trains from (4-bit for qlora); on a GPU, batched bf16 generation is also not bit-exact between runs"]


def _split_search(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(the runs a report shows as results, a comparison's search runs). Without results (a search
    alone), the search runs are shown as results too."""
    search_runs = [r for r in runs if r.phase == "search"]
    return [r for r in runs if r.phase != "search"] or runs, search_runs


def render_markdown(runs: list[Run], *, title: str, command: str = "", plots: list[tuple[str, str]] = ()) -> str:
    """The whole report. ``plots`` is [(caption, file name relative to the report)]."""
    runs = sorted(runs, key=lambda r: (r.name, _config_key(r)))  # the order runs were given in must not matter
    runs, search_runs = _split_search(runs)
    groups = group_runs(runs)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    lines += _setup(runs) + [""]
    lines += [
        "Each row is one method (mean ± standard deviation over seeds where there are several); ROUGE is the",
        "fine-tuned model's, with its change against the base model in brackets. Best value of each column in bold.",
        ROUGE_CONVENTION,
        "",
    ]
    if any("forgetting_change" in g.stats for g in groups):
        lines[-1:-1] = ["General-text loss change: the fine-tuned model's language-modelling loss on general text minus the",
                        "base model's (nats per token; positive: forgetting), mean over seeds."]
    lines += _table(groups, _columns_for(groups)) + [""]
    lines += _plugin_sections(runs)
    if any(g.grid for g in groups) or any(len(g.ok_runs) > 1 for g in groups):
        lines += ["## Ranking by ROUGE-1", "",
                  "A configuration whose mean is closer to the best's than the two configurations' standard deviations",
                  "combined (√(s₁² + s₂²), the spread of a difference between single runs) is marked a tie: the seeds",
                  "do not tell them apart.", ""] + _ranking(groups) + [""]
    if search_runs:
        lines += ["## Search", "",
                  "Each grid point was trained once and scored on a split carved from train (never trained on, never",
                  "reported above); each method's best point was then trained once per seed and scored on the split above.",
                  *_search_budget(search_runs, runs), ""] + _search(search_runs, runs) + [""]
        edges = _grid_edges(search_runs, runs)
        if edges:
            lines += edges + [""]
    lines += ["## Settings", ""] + _settings(groups) + [""]
    notes = _notes(groups)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        lines += ["## Plots", ""] + [line for caption, name in plots for line in (f"![{caption}]({name})", "")]
    lines += ["## Environment", ""] + _environment(runs + search_runs)
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower x and higher y are better), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


PLOTS = (  # (file suffix, x statistic, x axis label, log scale, x scale factor)
    ("rouge1_vs_params", "trainable", "trainable parameters", True, 1.0),
    ("rouge1_vs_train_time", "train_time", "training time (s)", False, 1.0),
    ("rouge1_vs_memory", "peak_memory", "peak memory (GiB)", False, 1 / 2**30),
)


def write_plots(runs: list[Run], directory: Path, stem: str) -> list[tuple[str, str]]:
    """PNG plots (Agg backend, no display needed); returns [(caption, file name)] of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, search_runs = _split_search(runs)
    groups = [g for g in group_runs(runs) if g.ok_runs]
    if not groups:
        return []
    colors = {g.label: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    written = [_scatter_plot(plt, groups, colors, directory, stem, *plot) for plot in PLOTS]
    written.append(_loss_plot(plt, groups, colors, directory, stem))
    written.append(_search_plot(plt, search_runs, directory, stem))
    return [w for w in written if w]


def _search_plot(plt, search_runs: list[Run], directory: Path, stem: str) -> tuple[str, str] | None:
    """The search's score against the learning rate, one line per method and setting of the grid's
    other keys (e.g. "lora, target_modules=all-linear"), so that a line joins comparable points only."""
    key = "trainer.learning_rate"
    lines: dict[str, list[tuple[float, float]]] = {}
    for run in search_runs:
        lr = run.grid.get(key)
        if run.ok and isinstance(lr, (int, float)):
            others = ", ".join(f"{k.rpartition('.')[2]}={_compact(v)}" for k, v in sorted(run.grid.items()) if k != key)
            label = run.entry_label + (f", {others}" if others else "")
            lines.setdefault(label, []).append((float(lr), run.finetuned.rouge1))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=plt.get_cmap("tab10")(i % 10), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("ROUGE-1 on the search split")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return "search: ROUGE-1 vs learning rate", _save(plt, fig, ax, "Search: ROUGE-1 vs learning rate",
                                                      directory / f"{stem}_search.png")


def _scatter_plot(plt, groups: list[Group], colors: dict, directory: Path, stem: str,
                  suffix: str, key: str, xlabel: str, log: bool, scale: float) -> tuple[str, str] | None:
    """ROUGE-1 against one cost (parameters, time, memory), with the Pareto front and the base model."""
    points = [(g.stats[key].mean * scale, g.stats["rouge1"].mean, g) for g in groups if key in g.stats and "rouge1" in g.stats]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for x, y, g in points:
        err = g.stats["rouge1"].std
        ax.errorbar(x, y, yerr=err, fmt="o", color=colors[g.label], capsize=3, markersize=7)
        ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    base = [g.stats["base_rouge1"].mean for g in groups if "base_rouge1" in g.stats]
    if base:
        ax.axhline(statistics.fmean(base), color="black", linewidth=0.8, linestyle=":", label="base model")
    front = pareto_front([(x, y) for x, y, _ in points])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", linewidth=1, label="Pareto front")
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the point labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ROUGE-1 (fine-tuned)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    caption = f"ROUGE-1 vs {xlabel.split(' (')[0]}"
    return caption, _save(plt, fig, ax, caption, directory / f"{stem}_{suffix}.png")


def _loss_plot(plt, groups: list[Group], colors: dict, directory: Path, stem: str) -> tuple[str, str] | None:
    curves = [(g, r, [(h["step"], h["loss"]) for h in r.record.train_info.metrics if "loss" in h and "step" in h])
              for g in groups for r in g.ok_runs]
    if not any(points for _, _, points in curves):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labelled = set()
    for g, r, points in curves:
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[g.label], linewidth=1.2,
                    label=None if g.label in labelled else g.label)
            labelled.add(g.label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return "training loss", _save(plt, fig, ax, "Training loss", directory / f"{stem}_loss.png")


def _save(plt, fig, ax, title: str, path: Path) -> str:
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path.name


def write_report(paths: list[str | Path], output: str | Path, *, command: str = "", title: str | None = None) -> Path:
    """Load the runs under ``paths``, write the plots and the Markdown report at ``output``."""
    output = Path(output)
    if output.is_dir():
        raise PeftbenchError(f"-o '{output}' is a folder.", "pass the Markdown file to write, e.g. -o reports/compare.md.")
    if output.suffix.lower() != ".md":
        raise PeftbenchError(f"-o '{output}' is not a Markdown file (.md); a report never replaces other files "
                             "(a run.json, say).", "pass a .md path, e.g. -o reports/compare.md.")
    runs = load_runs(paths)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(output.parent, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise PeftbenchError(f"cannot write the report into '{output.parent}': {e.strerror}.",
                             "pass -o with a path you can write to.") from None
    plots = write_plots(runs, output.parent, output.stem)
    title = title or f"peftbench comparison: {output.stem}"
    atomic_write_text(output, render_markdown(runs, title=title, command=command, plots=plots))
    return output
