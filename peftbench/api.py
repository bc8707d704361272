"""The plugin API: everything a plugin author needs, in one module.

Hooks (``peftbench_register_*``) receive a typed register object and call it with plugin classes.
A plugin class names itself (``name``), declares its options as a pydantic model (``Options``,
every field with a description: that is the help text recipes and ``peftbench methods`` show) and
implements a few methods; methods declare ``Capabilities`` that the host, exporters, reports and
tests read. Stages return typed results (``LoadedDataset``, ``TrainResult``, ``ExportResult``).
What a stage sees of the run is ``RunContext``: the pipeline's own run state, with ``ctx.record`` the
typed run.json so far (``RunRecord``, exported here), to read. The report hooks receive the same typed
``RunRecord``.
The host that loads plugins is ``peftbench.host``; the runner only ever talks to these interfaces.

Errors a plugin raises for the user (``PeftbenchError``: a problem and its fix; ``StageRefused``: a
stage declines this configuration) come from here too. Helpers a plugin may call are in
``peftbench.kit``; nothing else of peftbench is supported for plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Literal, TypeVar

import pluggy
from pydantic import BaseModel, ConfigDict

from peftbench.errors import PeftbenchError, StageRefused, did_you_mean  # PeftbenchError, StageRefused: for plugins
from peftbench.pipeline.context import RunContext
from peftbench.pipeline.record import RunRecord, Scores  # the run record report hooks receive (and ``RunContext.record``)
from peftbench.pipeline.resources import merged_model_bytes

if TYPE_CHECKING:  # heavy imports only for type checkers
    import argparse

    from datasets import DatasetDict

hookspec = pluggy.HookspecMarker("peftbench")
hookimpl = pluggy.HookimplMarker("peftbench")


class Options(BaseModel):
    """Base for every plugin's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do. The runner, exporters, reports and tests decide from these."""

    mergeable: bool = False  # merge() returns a standard transformers checkpoint with the training folded in
    needs_quantized_base: bool = False  # the base model is loaded in 4-bit (bitsandbytes)
    uses_peft: bool = True  # the trained model is a peft.PeftModel (adapter saved with save_pretrained)
    notes: str = ""  # one line a user should know (shown by `peftbench methods`)
    # Further capabilities, named by the plugins that need them: an exporter's ``requires`` may name
    # any string, and a method declares it here. The host knows no exporter's capability by name.
    provides: frozenset[str] = frozenset()

    def has(self, name: str) -> bool:
        """Whether the method declares capability ``name`` (a true flag above, or one of ``provides``)."""
        return name in self.names()

    def names(self) -> set[str]:
        flags = {k for k in ("mergeable", "needs_quantized_base", "uses_peft") if getattr(self, k)}
        return flags | set(self.provides)

    def as_dict(self) -> dict[str, Any]:
        return {"mergeable": self.mergeable, "needs_quantized_base": self.needs_quantized_base,
                "uses_peft": self.uses_peft, "notes": self.notes, "provides": sorted(self.provides)}


@dataclass
class LoadedDataset:
    """Splits ``train``/``validation``/``test`` (``test`` may be missing: the runner then scores
    ``validation``), each with columns ``id``, ``dialogue``, ``summary``; ``stats`` says what loading
    did (rows dropped, sampled, ...) and goes into run.json."""

    splits: "DatasetDict"
    stats: dict[str, Any] = field(default_factory=dict)


class DatasetPlugin:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def load(self, options: Options, seed: int) -> LoadedDataset:
        raise NotImplementedError


class MethodPlugin:
    """A parameter-efficient method: how the base model is loaded, and what is trained on it."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    capabilities: ClassVar[Capabilities] = Capabilities()

    def quantization_config(self, options: Options, policy) -> Any | None:
        """A transformers quantization config for loading the base model, or None."""
        return None

    def prepare_model_config(self, options: Options, model_config) -> None:
        """Change the base model's config before its weights load (e.g. add bias terms)."""

    def apply(self, model, options: Options, ctx: RunContext):
        """Return the model with the method applied; only the method's parameters trainable."""
        raise NotImplementedError

    def save(self, model, directory) -> None:
        """Write what was trained (for peft methods: the adapter, loadable with PeftModel.from_pretrained)."""
        model.save_pretrained(str(directory))

    def load(self, model, directory, options: Options):
        """Return ``model`` (a freshly loaded base) with what ``save`` wrote applied again."""
        if not self.capabilities.uses_peft:
            raise NotImplementedError(f"method '{self.name}' does not use peft and must implement load()")
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory))

    def merge(self, model, options: Options, ctx: RunContext):
        """Return a plain transformers model with the trained weights folded in (if mergeable)."""
        raise StageRefused(
            f"method '{self.name}' cannot be merged into the base weights.",
            "export the adapter only (exporter 'adapter'), or train a mergeable method such as lora.",
        )


@dataclass
class TrainResult:
    train_time_s: float
    steps: int
    tokens_seen: int  # non-pad tokens that went through the model during training, all processes together
    final_loss: float | None
    loss_history: list[dict] = field(default_factory=list)  # Trainer log_history entries
    peak_memory_bytes: int | None = None
    global_batch_size: int | None = None  # examples per optimiser step, summed over all processes
    memory_samples: list[int] = field(default_factory=list)  # memory in use after each optimiser step
    resumed_from_step: int | None = None  # continued from a checkpoint: time and memory cover only the rest


class TrainerPlugin:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def train(self, model, tokenizer, train_dataset, eval_dataset, options: Options, ctx: RunContext) -> TrainResult:
        raise NotImplementedError


@dataclass
class ExportResult:
    files: dict[str, str]  # label -> path
    sizes: dict[str, int] = field(default_factory=dict)  # label -> bytes
    info: dict[str, Any] = field(default_factory=dict)
    # Checks the written files failed (e.g. a GGUF that scores too low): the runner records the
    # result and marks the stage failed with these reasons.
    problems: list[str] = field(default_factory=list)
    # Scores of what was exported (e.g. the GGUF's smoke test): the runner records them as eval.<name>.
    scores: dict[str, dict] = field(default_factory=dict)


class ExporterPlugin:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    # Capabilities a method must declare for this exporter to run (checked at validation time).
    requires: ClassVar[tuple[str, ...]] = ()
    # Exporters whose files this one reads: validation wants them earlier in the recipe's list, and
    # `peftbench export --to NAME` runs them first.
    after: ClassVar[tuple[str, ...]] = ()
    # `peftbench export` on a finished run: whether it runs this exporter when --to is not given, and the
    # options it sets for it there (e.g. a smoke test against the run's own answers).
    export_default: ClassVar[bool] = False
    after_run_options: ClassVar[dict[str, Any]] = {}

    def missing_capabilities(self, capabilities: Capabilities) -> list[str]:
        """What ``requires`` names and a method with these capabilities lacks (empty: it can run)."""
        return [c for c in self.requires if not capabilities.has(c)]

    def export(self, options: Options, ctx: RunContext) -> ExportResult:
        raise NotImplementedError

    def estimated_bytes(self, options: Options, ctx: RunContext) -> int:
        """Disk space the export needs, checked before it runs. The default: a 16-bit merged copy of
        the model for exporters that merge, nothing for the rest; exporters that write more (a GGUF
        beside the merged checkpoint) say so."""
        if "mergeable" not in self.requires:
            return 0
        return merged_model_bytes(ctx.model)


class CommandPlugin:
    """A ``peftbench`` subcommand: ``peftbench NAME ...`` parses with ``add_arguments`` and calls
    ``run``. A PeftbenchError raised in ``run`` prints as one line and exits 2, as for built-in commands."""

    name: ClassVar[str]
    help: ClassVar[str] = ""  # one line in `peftbench --help`
    description: ClassVar[str | None] = None  # `peftbench NAME --help`; default: help

    def add_arguments(self, parser: "argparse.ArgumentParser") -> None:
        """Add the command's arguments and options to its parser."""

    def run(self, args: "argparse.Namespace") -> int:
        """Do the command; return its exit code (0: success)."""
        raise NotImplementedError


Status = Literal["OK", "WARN", "FAIL"]


@dataclass
class Check:
    """One line of ``peftbench doctor``: OK, WARN (optional part missing) or FAIL (every run needs it), with a fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""


# A doctor check: returns its lines; a check that raises is reported as a FAIL naming it.
DoctorCheck = Callable[[], list[Check]]


# --- registration ------------------------------------------------------------------------------


T = TypeVar("T")


class DuplicatePluginName(PeftbenchError, ValueError):
    """Two plugins registered the same name: which one a recipe means would depend on load order."""


class Registry(Generic[T]):
    """Name -> plugin of one kind: the typed register object ``peftbench_register_*`` hooks receive.

    ``register(PluginClass)`` checks what is added (a subclass of the kind's base class, with a name)
    and rejects a name registered twice, naming both plugins."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self.current_plugin = "?"

    def __call__(self, plugin: T) -> None:
        """Register one plugin (a class or an instance)."""
        obj = plugin() if isinstance(plugin, type) else plugin
        if not isinstance(obj, self.base):
            raise TypeError(f"{self.kind} plugin {obj!r} must subclass {self.base.__name__}")
        name = getattr(obj, "name", None)
        if not name or not isinstance(name, str):
            raise TypeError(f"{self.kind} plugin {obj!r} has no name")
        if name in self._items:
            raise DuplicatePluginName(
                f"{self.kind} '{name}' registered twice (by {self._origin[name]} and {self.current_plugin}).",
                f"uninstall one of the two, or choose which third-party plugins load with PEFTBENCH_PLUGINS=name,...",
            )
        self._items[name] = obj
        self._origin[name] = self.current_plugin

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise PeftbenchError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._items)}",
                f"use one of: {', '.join(sorted(self._items))} (see `peftbench plugins`).",
            ) from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self):
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items


# --- hooks ---------------------------------------------------------------------------------------


@hookspec
def peftbench_register_datasets(register: Registry[DatasetPlugin]) -> None:
    "Register dataset plugins that load dialogue/summary splits: ``register(MyDataset)``."


@hookspec
def peftbench_register_methods(register: Registry[MethodPlugin]) -> None:
    "Register parameter-efficient fine-tuning methods: ``register(MyMethod)``."


@hookspec
def peftbench_register_trainers(register: Registry[TrainerPlugin]) -> None:
    "Register trainers that run the optimisation loop: ``register(MyTrainer)``."


@hookspec
def peftbench_register_exporters(register: Registry[ExporterPlugin]) -> None:
    "Register exporters that write the trained model in some format: ``register(MyExporter)``."


@hookspec
def peftbench_register_commands(register: Registry[CommandPlugin]) -> None:
    "Register ``peftbench`` subcommands: ``register(MyCommand)``."


@hookspec
def peftbench_doctor_checks() -> list[DoctorCheck]:
    "Return environment checks for ``peftbench doctor``, each a function returning its ``Check`` lines."


# The report hooks receive the typed run record, ``RunRecord`` (what ``RunContext.record`` is), never
# run.json as a dict: what peftbench owns is typed (``record.name``, ``record.run_info.exports_after_run``,
# ``record.run_info.recipe.method.options``); what a plugin's exporter recorded stays the plugin's own,
# open layout: ``record.exports[name].info`` (its keys beyond ``files`` and ``sizes``) and
# ``record.eval[key].info`` (its scores' keys beyond the typed ROUGE, ``n`` and timings); ``.as_json()`` of
# any part gives it as run.json holds it. Records of older layouts are migrated before a hook sees them. Read only.


@hookspec
def peftbench_run_report_sections(record: RunRecord) -> list[str]:
    "Return Markdown lines for a run's report.md about what this plugin recorded in the typed run ``record``."


@hookspec
def peftbench_comparison_report_sections(records: list[RunRecord]) -> list[str]:
    "Return Markdown lines (``## Heading`` and body) for the comparison report over these runs' typed records."


@hookspec(firstresult=True)
def peftbench_score_label(key: str, scores: Scores) -> str | None:
    "Return the ROUGE table's label for the ``eval.<key>`` scores this plugin's exporter recorded, or None."


@hookspec
def peftbench_print_run_summary(record: RunRecord) -> None:
    "Print what a run or an export recorded of this plugin's results (typed ``record``) on the terminal (``kit.console``)."
