"""What a plugin provides, for each of the four kinds.

A plugin class names itself (``name``), declares its options as a pydantic model (``Options``,
every field with a description: that is the help text recipes and ``peftbench methods`` show) and
implements a few methods. The runner only ever talks to these interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # heavy imports only for type checkers
    from datasets import DatasetDict

    from peftbench.pipeline.context import RunContext


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

    def apply(self, model, options: Options, ctx: "RunContext"):
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

    def merge(self, model, ctx: "RunContext"):
        """Return a plain transformers model with the trained weights folded in (if mergeable)."""
        from peftbench.errors import StageRefused

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

    def train(self, model, tokenizer, train_dataset, eval_dataset, options: Options, ctx: "RunContext") -> TrainResult:
        raise NotImplementedError


@dataclass
class ExportResult:
    files: dict[str, str]  # label -> path
    sizes: dict[str, int] = field(default_factory=dict)  # label -> bytes
    info: dict[str, Any] = field(default_factory=dict)
    # Checks the written files failed (e.g. a GGUF that scores too low): the runner records the
    # result and marks the stage failed with these reasons.
    problems: list[str] = field(default_factory=list)


class ExporterPlugin:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    # Capabilities a method must declare for this exporter to run (checked at validation time).
    requires: ClassVar[tuple[str, ...]] = ()
    # Exporters whose files this one reads: validation wants them earlier in the recipe's list.
    after: ClassVar[tuple[str, ...]] = ()

    def export(self, options: Options, ctx: "RunContext") -> ExportResult:
        raise NotImplementedError

    def estimated_bytes(self, options: Options, ctx: "RunContext") -> int:
        """Disk space the export needs, checked before it runs. The default: a 16-bit merged copy of
        the model for exporters that merge, nothing for the rest; exporters that write more (a GGUF
        beside the merged checkpoint) say so."""
        if "mergeable" not in self.requires:
            return 0
        from peftbench.pipeline.resources import merged_model_bytes

        return merged_model_bytes(ctx.model)
