"""Exporter ``adapter``: the trained PEFT adapter, loadable with ``PeftModel.from_pretrained``, with
a model card (README.md) as peft and the Hugging Face Hub expect one."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from peftbench.api import ExporterPlugin, ExportResult, hookimpl
from peftbench.kit import atomic_write_text, dir_size


class AdapterExporter(ExporterPlugin):
    """The runner always saves the adapter (exporters need it); this records where and how big, and
    writes its model card."""

    name = "adapter"

    def export(self, options, ctx) -> ExportResult:
        atomic_write_text(ctx.adapter_dir / "README.md", model_card(ctx.record.as_json(), ctx.recipe.resolved_dict()))
        return ExportResult(files={"adapter": str(ctx.adapter_dir)}, sizes={"adapter": dir_size(ctx.adapter_dir)})


def invoking_command() -> str | None:
    """The peftbench command line of this process, when it is one (not a test or a library call)."""
    import shlex

    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("peftbench", "__main__.py"):
        return shlex.join(["peftbench", *sys.argv[1:]])
    return None


def model_card(record: dict, recipe: dict) -> str:
    """README.md for the adapter directory: Hub metadata, then what was trained on what, how, and how
    it scored (peft writes a template README.md that says none of this)."""
    model, method = recipe.get("model", {}), recipe.get("method", {})
    dataset = recipe.get("dataset", {})
    meta = {"base_model": model.get("name"), "library_name": "peft",
            "tags": ["peftbench", str(method.get("name")), "summarization"],
            "datasets": [dataset.get("path") or dataset.get("name")]}
    evals = record.get("eval", {})
    rows = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | n |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, key in (("base model", "baseline"), ("fine-tuned", "finetuned")):
        if key in evals:
            e = evals[key]
            rows.append(f"| {label} | {e['rouge1']:.2f} | {e['rouge2']:.2f} | {e['rougeL']:.2f} | {e['rougeLsum']:.2f} | {e['n']} |")
    train = record.get("train_info", {})
    split = record.get("meta_info", {}).get("dataset_info", {}).get("eval_split", "?")
    command = invoking_command()
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n",
        f"# {method.get('name')} adapter for {model.get('name')}\n",
        f"Trained with [peftbench](https://pypi.org/project/peftbench/): method `{method.get('name')}` on "
        f"`{dataset.get('path') or dataset.get('name')}`, {train.get('steps')} optimiser steps "
        f"({train.get('num_trainable_params', 0):,} trainable parameters, "
        f"{train.get('trainable_percent')}% of the model).\n",
        "## Use\n",
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({model.get('name')!r})\n"
        "model = PeftModel.from_pretrained(base, \"path/to/this/adapter\")\n```\n",
        f"## Scores (ROUGE, {split} split, greedy decoding)\n",
        "\n".join(rows) + "\n",
        "ROUGE-1/2/L from rouge-score with stemming, averaged per example; ROUGE-Lsum with one sentence per line, "
        "as the Hugging Face summarisation examples compute it.\n",
        "## How it was made\n",
        (f"```bash\n{command}\n```\n" if command else "") + "The resolved recipe:\n",
        "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```\n",
    ]
    return "\n".join(parts)


@hookimpl
def peftbench_register_exporters(register):
    register(AdapterExporter)
