"""Comparison recipes: one base recipe, several methods (and seeds, and a small grid), one report.

A comparison recipe is a YAML mapping::

    base: recipes/quickstart.yaml        # a recipe file, an inline recipe, or {extends: FILE, <sections>}
    methods:                              # or `runs:`; each entry is a method name or a mapping
      - lora
      - method: {name: ia3}
        trainer: {learning_rate: 1.0e-2}  # the method's own optimiser settings
      - recipe: recipes/methods/prefix_tuning_quickstart.yaml   # its method section and optimiser settings
    seeds: [1, 2, 3]                      # optional: every run once per seed
    grid: {trainer.learning_rate: [1.0e-4, 1.0e-3]}   # optional: expands every run (also per entry)
    search: {split: selection}            # optional: the grid is searched, not reported (below)

Without ``search``, every grid point is run once per seed and reported. With it, the comparison has two
phases: each grid point is trained once (the first seed) and scored on the search split (by default
``selection``: rows carved from train, never trained on), the best point of each entry by the search
metric is kept, and only that setting is trained once per seed and scored on the base recipe's
evaluation split, the one the report shows. The split a comparison reports is never the one it chose
its settings on.

Every run shares the base's model, data, prompt, evaluation, exporters and token budget; an entry can
change only its method and its trainer's optimiser settings, so the comparison is fair by construction.
Every expanded run is validated before the first one starts; ``peftbench.compare.run`` runs them.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftbench.compare.extension import outward_points
from peftbench.errors import PeftbenchError
from peftbench.host import Host, get_host
from peftbench.pipeline.recipe import _describe as describe_errors  # recipes' wording for schema errors
from peftbench.pipeline.recipe import apply_overrides, read_recipe_file, set_key, validate_recipe
from peftbench.pipeline.record import RunRecord, default_run_dir

# hf trainer options that fix how much data a run sees: equal across runs unless a grid varies them.
BUDGET_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum")
# hf trainer options a method recipe (`recipe:` in an entry) may bring: those that depend on the method.
METHOD_TRAINER_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm")


class RunEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(None, description="run name in directories and reports; default: the method name")
    recipe: str | None = Field(
        None, description="recipe file whose method section and optimiser settings (learning rate, ...) this run takes"
    )
    method: str | dict | None = Field(None, description="method name, or {name: ..., options}; same name as the base merges")
    trainer: dict = Field(default_factory=dict, description="trainer options for this method, e.g. learning_rate")
    grid: dict[str, list] = Field(default_factory=dict, description="key.path: [values] expanded for this entry only")


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["selection", "validation", "test"] = Field(
        "selection", description="split the grid points are scored on (selection: carved from train)")
    selection_size: int = Field(500, gt=0, description="rows carved from train for the selection split")
    metric: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = Field("rouge1", description="what the search maximises")
    seed: int | None = Field(None, description="seed of the search runs; default: the first of `seeds`")
    max_samples: int | None = Field(None, gt=0, description="score only the first N rows of the search split")
    max_steps: int | None = Field(
        None, gt=0, description="train each grid point for this many optimiser steps, the same for every method "
        "(a short-horizon search: cheaper, and the report says so); default: the final runs' budget")
    extend: int = Field(
        2, ge=0, description="when an entry's best point lies on the edge of a numeric grid axis, search the next point "
        "past it (the grid's own spacing), up to this many times per entry; 0: the grid as given")


class ComparisonRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str | dict = Field(description="recipe file, inline recipe, or {extends: FILE, <sections merged over it>}")
    runs: list[str | RunEntry] = Field(
        validation_alias=AliasChoices("runs", "methods"), min_length=1, description="the methods to compare"
    )
    seeds: list[int] | None = Field(None, min_length=1, description="run everything once per seed; default: the base's seed")
    grid: dict[str, list] = Field(default_factory=dict, description="key.path: [values] expanded for every run")
    search: SearchSpec | None = Field(None, description="choose each entry's grid point on a split the report does not show")
    output_dir: str | None = Field(None, description="parent of the run directories; default runs/<file name>")
    report: str | None = Field(None, description="Markdown report path (PNG plots beside it); default <output_dir>/comparison.md")

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict) -> dict:
        return _check_grid(grid)


def _check_grid(grid: dict) -> dict:
    for key, values in grid.items():
        if "." not in key:
            raise ValueError(f"grid key '{key}' must be a section path such as method.r or trainer.learning_rate")
        if not values:
            raise ValueError(f"grid key '{key}' has no values")
    return grid


@dataclass(eq=False)  # identity: a run is a key of the records its comparison collects
class PlannedRun:
    name: str  # directory name: config plus seed
    config: str  # the configuration, shared by its seeds (label plus grid point)
    label: str
    seed: int
    grid: dict[str, Any]
    raw: dict  # the recipe this run validates and runs
    notes: list[str] = field(default_factory=list)
    phase: str = "final"  # "search": a grid point scored on the search split, not reported as a result
    extension: int = 0  # for a search run: 0 on the grid as given, k for the k-th step past its edge
    chosen_by: dict | None = None  # for the final runs of a search: the search split, metric and value

    def annotation(self) -> dict:
        """What run.json records about this run's place in the comparison (reports group by it)."""
        out = {"config": self.config, "label": self.label, "seed": self.seed, "grid": self.grid, "notes": self.notes}
        if self.phase != "final" or self.chosen_by:
            out.update(phase=self.phase, chosen_by=self.chosen_by)
        if self.extension:
            out["extension"] = self.extension
        return out


@dataclass
class Comparison:
    source: str
    runs: list[PlannedRun]  # without a search: every run; with one: the search runs (one per grid point)
    output_dir: Path
    report_path: Path
    search: SearchSpec | None = None
    candidates: dict[str, list[PlannedRun]] = field(default_factory=dict)  # search config -> its runs per seed

    def all_runs(self) -> list[PlannedRun]:
        return self.runs + [run for runs in self.candidates.values() for run in runs]


def is_comparison(raw: dict) -> bool:
    return "base" in raw and ("runs" in raw or "methods" in raw)


def is_comparison_file(path: str | Path) -> bool:
    return is_comparison(read_recipe_file(path))


# --- expansion -----------------------------------------------------------------------------------


def load_comparison(path: str | Path, overrides: list[str] = (), output_dir: str | None = None,
                    host: Host | None = None) -> Comparison:
    """Read, expand and validate a comparison recipe; raises one PeftbenchError naming every problem."""
    source = str(path)
    raw = read_recipe_file(path)
    try:
        spec = ComparisonRecipe.model_validate(raw)
    except ValidationError as e:
        raise PeftbenchError(f"comparison '{source}' is invalid: " + "; ".join(describe_errors(e, ComparisonRecipe, raw)) + ".",
                             "start from recipes/compare_quickstart.yaml (the format is in peftbench/compare/plan.py).") from None
    host = host or get_host()
    out = default_run_dir(source, output_dir or spec.output_dir)
    report = Path(spec.report) if spec.report else out / "comparison.md"
    runs = expand(spec, list(overrides), host)
    if spec.search is None:
        _validate_all(source, runs, host)
        return Comparison(source=source, runs=runs, output_dir=out, report_path=report)
    searched, candidates = plan_search(spec.search, runs)
    _validate_all(source, searched + [run for runs in candidates.values() for run in runs], host)
    return Comparison(source=source, runs=searched, output_dir=out, report_path=report, search=spec.search,
                      candidates=candidates)


def expand(spec: ComparisonRecipe, overrides: list[str], host: Host) -> list[PlannedRun]:
    base = _load_base(spec.base)
    seeds = spec.seeds or [base.get("seed", 42)]
    planned: list[PlannedRun] = []
    for entry in spec.runs:
        entry = RunEntry(method=entry) if isinstance(entry, str) else entry
        run_raw, notes = _merge_entry(base, entry)
        label = _safe(entry.label or run_raw["method"].get("name") or "run")
        grid = {**spec.grid, **_check_grid(entry.grid)}
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
        for point in points:
            config = config_name(label, point)
            point_raw = copy.deepcopy(run_raw)
            for key, value in point.items():
                set_key(point_raw, key, value)
            point_raw = apply_overrides(point_raw, overrides)  # the command line has the last word
            for seed in seeds:
                seed_raw = {**copy.deepcopy(point_raw), "seed": seed}
                seed_raw.pop("output_dir", None)
                run_notes = notes + _drop_unsupported_exporters(seed_raw, host)
                name = f"{config}-seed{seed}" if len(seeds) > 1 else config
                planned.append(PlannedRun(name=name, config=config, label=label, seed=seed, grid=point,
                                          raw=seed_raw, notes=run_notes))
    return planned


def config_name(label: str, point: dict[str, Any]) -> str:
    """A configuration's directory name: its label, then each grid key's last part and value."""
    return label + "".join(f"-{key.split('.')[-1]}{_safe(str(value))}" for key, value in point.items())


def plan_search(search: SearchSpec, runs: list[PlannedRun]) -> tuple[list[PlannedRun], dict[str, list[PlannedRun]]]:
    """The search runs (each grid point once, scored on the search split, adapter only) and, per grid
    point, the runs that follow if it is chosen (one per seed, as expanded)."""
    reported = {(run.raw.get("evaluation") or {}).get("split", "test") for run in runs}
    if search.split in reported:
        raise PeftbenchError(f"search.split '{search.split}' is the split this comparison reports: settings chosen on it "
                             "would be scored on the examples that chose them.",
                             "search on `selection` (carved from train) and report on validation or test.")
    if not any(run.grid for run in runs):
        raise PeftbenchError("the comparison has a `search:` section but no grid to search.",
                             "add grid: {trainer.learning_rate: [...]} to the comparison or to its entries.")
    candidates: dict[str, list[PlannedRun]] = {}
    for run in runs:
        candidates.setdefault(run.config, []).append(run)
    searched = []
    for config, members in candidates.items():
        first = members[0]
        seed = search.seed if search.seed is not None else first.seed
        raw = {**copy.deepcopy(first.raw), "seed": seed}
        raw["evaluation"] = {**(raw.get("evaluation") or {}), "split": search.split, "selection_size": search.selection_size,
                             "max_samples": search.max_samples, "baseline": False}
        if search.max_steps:  # the trainer fits the learning-rate schedule (warm-up, decay) to the shorter run
            trainer = raw.get("trainer") or {}
            raw["trainer"] = {**trainer, "max_steps": min(search.max_steps, trainer.get("max_steps") or search.max_steps)}
        # the search scores adapters; merging and converting every grid point would only cost time
        raw["exporters"] = [ref for ref in raw.get("exporters") or [] if isinstance(ref, dict) and ref.get("name") == "adapter"]
        searched.append(PlannedRun(name=f"search/{config}", config=config, label=first.label, seed=seed, grid=first.grid,
                                   raw=raw, notes=list(first.notes), phase="search"))
    return searched, candidates


def choose(comparison: Comparison, records: dict[str, RunRecord]) -> tuple[list[PlannedRun], list[str]]:
    """After the search: per entry, the grid point with the best search metric (the first of equals,
    in grid order), and its runs per seed. Returns those runs and a line per entry saying what was
    chosen (and the path past the grid's edge, if the search went there), or that nothing finished."""
    metric, chosen, lines = comparison.search.metric, [], []
    for label in dict.fromkeys(run.label for run in comparison.runs):
        runs = [r for r in comparison.runs if r.label == label]
        best = best_search_run(runs, records, metric)
        if best is None:
            lines.append(f"{label}: no search run finished, so it has no final runs")
            continue
        value, run, scored = best
        by = {"split": comparison.search.split, "metric": metric, "value": value, "search_run": run.name}
        for final in comparison.candidates[run.config]:
            final.chosen_by = by
            chosen.append(final)
        grid = ", ".join(f"{k}={v}" for k, v in run.grid.items())
        lines.append(f"{label}: {grid} ({metric} {value:.2f} on {comparison.search.split}, best of {scored})"
                     + _extension_path(runs, records, metric))
    return chosen, lines


def best_search_run(runs: list[PlannedRun], records: dict[str, RunRecord], metric: str) -> tuple[float, PlannedRun, int] | None:
    """(score, run, how many scored) of the best finished search run, the first of equals; None if none finished."""
    scored = [(value, run) for run in runs if (value := _search_score(records.get(run.name), metric)) is not None]
    if not scored:
        return None
    value, run = max(scored, key=lambda pair: pair[0])  # max keeps the first of equal values
    return value, run, len(scored)


def _search_score(record: RunRecord | None, metric: str) -> float | None:
    tuned = record.eval.get("finetuned") if record else None
    if tuned is None or record.run_info.status != "success":
        return None
    return tuned.rouge(metric)


def extend_search(comparison: Comparison, records: dict[str, RunRecord], host: Host | None = None) -> tuple[list[PlannedRun], list[str]]:
    """Search runs one step past the grid's edge, for each entry whose best point so far lies on the edge of a
    numeric axis and that has extensions left (``search.extend``); each with its final runs as candidates.
    Returns the new search runs and a note for each point that could not be planned (its recipe invalid)."""
    host, search, new, notes = host or get_host(), comparison.search, [], []
    for label in dict.fromkeys(run.label for run in comparison.runs):
        runs = [r for r in comparison.runs if r.label == label]
        best = best_search_run(runs, records, search.metric)
        step = max(r.extension for r in runs) + 1
        if best is None or step > search.extend:
            continue
        for point in outward_points(best[1].grid, [r.grid for r in runs]):
            try:
                search_run, finals = _past_the_edge(comparison, best[1], point, step, host)
            except PeftbenchError as e:
                notes.append(f"{label}: {config_name(label, point)} past the grid's edge was not searched: {e.problem}")
                continue
            comparison.runs.append(search_run)
            comparison.candidates[search_run.config] = finals
            new.append(search_run)
    return new, notes


def _past_the_edge(comparison: Comparison, best: PlannedRun, point: dict, step: int, host: Host):
    """The search run of ``point`` (a copy of ``best``'s with the grid point changed) and its final runs (copies of
    ``best``'s), validated like every planned run."""
    config = config_name(best.label, point)
    search_raw = copy.deepcopy(best.raw)
    for key, value in point.items():
        set_key(search_raw, key, value)
    search_run = PlannedRun(name=f"search/{config}", config=config, label=best.label, seed=best.seed, grid=point,
                            raw=search_raw, notes=list(best.notes), phase="search", extension=step)
    finals = []
    for final in comparison.candidates[best.config]:
        raw = copy.deepcopy(final.raw)
        for key, value in point.items():
            set_key(raw, key, value)
        name = final.name.replace(final.config, config, 1)
        finals.append(PlannedRun(name=name, config=config, label=final.label, seed=final.seed, grid=point, raw=raw,
                                 notes=list(final.notes)))
    _validate_all(comparison.source, [search_run, *finals], host)
    return search_run, finals


def _extension_path(runs: list[PlannedRun], records: dict[str, RunRecord], metric: str) -> str:
    """``; past the grid's edge: learning_rate=0.018 (31.20), learning_rate=0.054 (30.10)``, or nothing."""
    past = sorted((r for r in runs if r.extension), key=lambda r: r.extension)
    if not past:
        return ""
    steps = []
    for run in past:
        value = _search_score(records.get(run.name), metric)
        grid = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run.grid.items())
        steps.append(f"{grid} ({'failed' if value is None else f'{value:.2f}'})")
    return "; past the grid's edge: " + " -> ".join(steps)


def _load_base(base: str | dict) -> dict:
    if isinstance(base, str):
        return read_recipe_file(base)
    base = copy.deepcopy(base)
    parent = base.pop("extends", None)
    return _deep_merge(read_recipe_file(parent), base) if parent else base


def _merge_entry(base: dict, entry: RunEntry) -> tuple[dict, list[str]]:
    """The base recipe with this entry's method and trainer settings; the data, prompt, evaluation and
    budget stay the base's."""
    notes: list[str] = []
    method, trainer = None, {}
    if entry.recipe:
        other = read_recipe_file(entry.recipe)
        method = other.get("method")
        other_trainer = other.get("trainer") or {}
        trainer = {k: v for k, v in other_trainer.items() if k in METHOD_TRAINER_KEYS}
        ignored = sorted(k for k in other_trainer if k not in METHOD_TRAINER_KEYS and k != "name"
                         and other_trainer[k] != (base.get("trainer") or {}).get(k))
        if ignored:
            notes.append(f"from {entry.recipe} took the method and {', '.join(sorted(trainer)) or 'no trainer settings'}; "
                         f"kept the base's {', '.join(ignored)} so every run has the same budget")
    if entry.method is not None:
        given = {"name": entry.method} if isinstance(entry.method, str) else entry.method
        current = method or base.get("method") or {}
        given = given if "name" in given else {"name": current.get("name"), **given}  # options for the method in use
        method = _deep_merge(method, given) if method and given["name"] == method.get("name") else given
    raw = copy.deepcopy(base)
    if method is not None:
        same = (raw.get("method") or {}).get("name") == method.get("name")
        raw["method"] = _deep_merge(raw["method"], method) if same else copy.deepcopy(method)
    raw["trainer"] = _deep_merge(raw.get("trainer") or {}, {**trainer, **entry.trainer})
    return raw, notes


def _drop_unsupported_exporters(raw: dict, host: Host) -> list[str]:
    """Exporters whose required capabilities the run's method lacks are left out of that run, with a
    note (a comparison of prefix tuning and LoRA should still export the LoRA runs to GGUF)."""
    method_name = (raw.get("method") or {}).get("name")
    if method_name not in host.methods or not isinstance(raw.get("exporters"), list):
        return []  # unknown names are reported by validation
    caps = host.methods.get(method_name).capabilities
    kept, notes = [], []
    for ref in raw["exporters"]:
        name = ref.get("name") if isinstance(ref, dict) else None
        missing = host.exporters.get(name).missing_capabilities(caps) if name in host.exporters else []
        if missing:
            notes.append(f"exporter '{name}' left out: method '{method_name}' lacks {', '.join(missing)}")
        else:
            kept.append(ref)
    raw["exporters"] = kept
    return notes


def _validate_all(source: str, runs: list[PlannedRun], host: Host) -> None:
    """Validate every run before any starts; the same problem in several runs is reported once."""
    problems: dict[str, list[str]] = {}
    resolved = {}
    prefix = f"recipe '{source}' is invalid: "
    for run in runs:
        try:
            resolved[run.name] = validate_recipe(run.raw, source=source, host=host)
        except PeftbenchError as e:
            problems.setdefault(e.problem.removeprefix(prefix).rstrip("."), []).append(run.name)
    names = [run.name for run in runs]
    for label in sorted({run.label for run in runs if names.count(run.name) > 1}):  # two entries, one label
        problems[f"two entries are named '{label}' (give one a different `label:`)"] = []
    for phase in dict.fromkeys(run.phase for run in runs):  # a search may have a budget of its own
        problems.update(_budget_problems([run for run in runs if run.phase == phase], resolved))
    if problems:
        text = "; ".join(detail + _who(who, names) for detail, who in problems.items())
        raise PeftbenchError(
            f"comparison '{source}' is invalid: {text}.",
            "correct the base recipe, the entries or the key=value overrides (`peftbench validate` checks without running).",
        )


def _who(who: list[str], names: list[str]) -> str:
    """The runs a problem applies to: none named for a comparison-wide problem, "every run" rather than
    a list of dozens when it is the base recipe's."""
    if not who:
        return ""
    return " [every run]" if len(names) > 1 and set(who) == set(names) else f" [{', '.join(who)}]"


def _budget_problems(runs: list[PlannedRun], resolved: dict) -> dict[str, list[str]]:
    budgets: dict[tuple, set[str]] = {}
    for run in runs:
        r = resolved.get(run.name)
        if r is None:
            continue
        options = r.trainer_options.model_dump()
        varied = {key.split(".", 1)[1] for key in run.grid if key.startswith("trainer.")}
        budget = tuple((k, options[k]) for k in BUDGET_KEYS if k in options and k not in varied)
        budgets.setdefault(budget, set()).add(run.label)
    if len(budgets) <= 1:
        return {}
    differing = [k for k in BUDGET_KEYS if len({dict(b).get(k) for b in budgets}) > 1]
    described = " vs ".join(", ".join(f"{k}={dict(b).get(k)}" for k in differing) + f" ({', '.join(sorted(labels))})"
                            for b, labels in budgets.items())
    return {f"runs differ in training budget: {described}; set the budget in the base recipe only": []}


def _deep_merge(base: dict | None, over: dict | None) -> dict:
    out = copy.deepcopy(base or {})
    for key, value in (over or {}).items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "run"
