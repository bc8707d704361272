"""What every stage of a run can see (the plugin API's ``RunContext`` protocol, implemented)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftbench.pipeline.device import DevicePolicy
from peftbench.pipeline.recipe import ResolvedRecipe


@dataclass
class RunContext:
    recipe: ResolvedRecipe
    run_dir: Path
    policy: DevicePolicy
    model_source: str  # what from_pretrained loads the base model from (a directory or hub id)
    tokenizer: Any = None
    model: Any = None  # the model being trained (a PeftModel for peft methods)
    resume: bool = False
    eval_dataset: Any = None  # the examples evaluation scores (exporters' smoke tests score the same)
    exports: dict = field(default_factory=dict)  # exporter name -> the ExportResult it returned, in recipe order
    record: dict = field(default_factory=dict)  # run.json so far, to read (stages return results; the runner records them)

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
