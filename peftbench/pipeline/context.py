"""The run in progress: the one object every stage of the pipeline and every plugin sees
(``peftbench.api.RunContext`` is this class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only (the plugin API imports this module: nothing here may import the API)
    from peftbench.pipeline.device import DevicePolicy
    from peftbench.pipeline.distributed import Processes
    from peftbench.pipeline.record import RunRecord, RunRecorder


@dataclass
class RunContext:
    """What a stage or a plugin can see of the run. Plugins read it and return results (the runner
    records them); ``record`` is run.json so far, typed, to read."""

    recipe: Any  # pipeline.recipe.ResolvedRecipe: .recipe (typed sections), .method, .method_options, ...
    run_dir: Path
    policy: DevicePolicy  # device and dtypes
    model_source: str  # what from_pretrained loads the base model from (a directory or hub id)
    tokenizer: Any = None
    model: Any = None  # the model being trained (a PeftModel for peft methods)
    resume: bool = False
    eval_dataset: Any = None  # the examples evaluation scores (exporters' smoke tests score the same)
    exports: dict[str, Any] = field(default_factory=dict)  # exporter name -> the ExportResult it returned, in recipe order
    # The runner's own state, shared by its stages:
    recorder: RunRecorder | None = None  # keeps run.json (None outside a run: a test, a benchmark)
    processes: Processes | None = None  # which process this is, and how to wait for the others
    data: Any = None  # the LoadedDataset: splits and loading statistics
    base_model: Any = None  # the base model, before the method is applied
    train_rows: int = 0  # rows of the tokenised train split

    @property
    def record(self) -> RunRecord | None:
        """run.json so far (``peftbench.pipeline.record.RunRecord``); None outside a run."""
        return self.recorder.record if self.recorder else None

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def exports_dir(self) -> Path:
        return self.run_dir / "exports"

    def load_base_model(self, *, quantized: bool | None = None):
        """A fresh copy of the base model as the method expects it (same config changes, same
        quantisation unless ``quantized=False``)."""
        from peftbench.pipeline.modeling import load_model

        method, options = self.recipe.method, self.recipe.method_options
        qconfig = None
        if quantized is not False:
            qconfig = method.quantization_config(options, self.policy)
        return load_model(
            self.model_source, self.policy, quantization_config=qconfig,
            prepare_config=lambda cfg: method.prepare_model_config(options, cfg),
            trust_remote_code=self.recipe.recipe.model.trust_remote_code,
            revision=self.recipe.recipe.model.revision,
        )
