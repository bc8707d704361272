"""The plugin API: everything a plugin author needs, in one module.

Hooks (``peftbench_register_*``) receive a typed register object and call it with plugin classes.
A plugin class names itself (``name``), declares its options as a pydantic model (``Options``,
every field with a description: that is the help text recipes and ``peftbench methods`` show) and
implements a few methods; methods declare ``Capabilities`` that the host, exporters, reports and
tests read. Stages return typed results (``LoadedDataset``, ``TrainResult``, ``ExportResult``).
What a stage sees of the run is ``RunContext``: the pipeline's own run state, with ``ctx.record`` the
typed run.json so far (``peftbench.pipeline.record.RunRecord``), to read.
The host that loads plugins is ``peftbench.host``; the runner only ever talks to these interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import pluggy
from pydantic import BaseModel, ConfigDict

from peftbench.errors import PeftbenchError, StageRefused, did_you_mean
from peftbench.pipeline.context import RunContext
from peftbench.pipeline.resources import merged_model_bytes

if TYPE_CHECKING:  # heavy imports only for type checkers
    from datasets import DatasetDict

hookspec = pluggy.HookspecMarker("peftbench")
hookimpl = pluggy.HookimplMarker("peftbench")


class Options(BaseModel):
    """Base for every plugin's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do. The runner, exporters, reports and tests decide from these."""

    mergeable: bool = False  # adapter weights fold into the base weights (merge_and_unload)
    gguf_exportable: bool = False  # a merged model is a standard checkpoint llama.cpp converts
    needs_quantized_base: bool = False  # the base model is loaded in 4-bit (bitsandbytes)
    uses_peft: bool = True  # the trained model is a peft.PeftModel (adapter saved with save_pretrained)
    notes: str = ""  # one line a user should know (shown by `peftbench methods`)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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
    # Exporters whose files this one reads: validation wants them earlier in the recipe's list.
    after: ClassVar[tuple[str, ...]] = ()

    def missing_capabilities(self, capabilities: Capabilities) -> list[str]:
        """What ``requires`` names and a method with these capabilities lacks (empty: it can run)."""
        return [c for c in self.requires if not getattr(capabilities, c, False)]

    def export(self, options: Options, ctx: RunContext) -> ExportResult:
        raise NotImplementedError

    def estimated_bytes(self, options: Options, ctx: RunContext) -> int:
        """Disk space the export needs, checked before it runs. The default: a 16-bit merged copy of
        the model for exporters that merge, nothing for the rest; exporters that write more (a GGUF
        beside the merged checkpoint) say so."""
        if "mergeable" not in self.requires:
            return 0
        return merged_model_bytes(ctx.model)


# --- registration ------------------------------------------------------------------------------


T = TypeVar("T")


def wrap_with_peft(model, peft_config):
    """``peft.get_peft_model``, with peft's "Target modules ... not found in the base model" as one
    line that says where the names go (peft raises a ValueError only once the model is built)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise PeftbenchError(f"{str(e).splitlines()[0].split('. Please')[0]} ({type(model).__name__}).",
                             "set method.target_modules to names of the model's linear layers "
                             "(for Llama-like models: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).") from None


MergeTarget = Literal["original", "nf4_roundtrip"]
MERGE_TARGET_HELP = ("16-bit weights the trained adapter of a 4-bit base is folded into when merging: the base's NF4 "
                     "weights dequantised (nf4_roundtrip, what the adapter was trained against: the GGUF keeps the "
                     "trained model's quality), or the original base (original)")


def base_for_merge(ctx: "RunContext", merge_into: MergeTarget):
    """A fresh 16-bit base for merging the adapter of a method that trained on a 4-bit base.
    Merging into the 4-bit weights themselves would round the update away, so the choice is which
    16-bit weights: the original ones, or the 4-bit ones dequantised, which the adapter learnt to
    correct (the difference grows with training: see qlora's merge_into default for figures)."""
    if merge_into == "nf4_roundtrip":
        model = ctx.load_base_model().dequantize()  # bitsandbytes: NF4 weights back in the compute dtype
        # transformers 5.17-5.23 `dequantize()` clears is_quantized but leaves is_loaded_in_4bit set,
        # and peft 0.21's IA3 merge refuses any model carrying that flag ("Cannot merge ia3 layers
        # when the model is loaded in 4-bit mode") although no 4-bit layer is left.
        model.is_loaded_in_4bit = False
        return model
    return ctx.load_base_model(quantized=False)


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
