"""Exporter ``merged``: the trained weights folded into the base model and saved as a standard
transformers checkpoint (safetensors, config, tokenizer with its chat template) in exports/merged/.

How a method merges is the method's business (``MethodPlugin.merge``: LoRA folds B·A into W, QLoRA
folds the saved adapter into a 16-bit base, ...); a method that cannot merge refuses with
StageRefused and the run goes on. The gguf exporter converts this same checkpoint:
``kit.merged_checkpoint`` writes it once per run and reuses it while the adapter it came from is
unchanged, so merged, gguf and ollama stages never merge twice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftbench.api import ExporterPlugin, ExportResult, Options, hookimpl
from peftbench.kit import dir_size, merged_checkpoint


class MergedOptions(Options):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the saved weights; auto keeps the dtype the fine-tuned model was evaluated in"
    )


class MergedExporter(ExporterPlugin):
    """A plain transformers checkpoint with the trained weights folded in."""

    name = "merged"
    Options = MergedOptions
    requires = ("mergeable",)

    def export(self, options: MergedOptions, ctx) -> ExportResult:
        directory, info = merged_checkpoint(ctx, options.dtype)
        return ExportResult(files={"merged": str(directory)}, sizes={"merged": dir_size(directory)}, info=info)


@hookimpl
def peftbench_register_exporters(register):
    register(MergedExporter)
