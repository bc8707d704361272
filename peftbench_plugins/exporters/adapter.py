"""Exporter ``adapter``: the trained PEFT adapter, loadable with ``PeftModel.from_pretrained``, with
a model card (README.md) as peft and the Hugging Face Hub expect one."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from peftbench.api import ExporterPlugin, ExportResult, RunRecord, hookimpl
from peftbench.kit import atomic_write_text, dir_size


class AdapterExporter(ExporterPlugin):
    """The runner always saves the adapter (exporters need it); this records where and how big, and
    writes its model card."""

    name = "adapter"

    def export(self, options, ctx) -> ExportResult:
        atomic_write_text(ctx.adapter_dir / "README.md", model_card(ctx.record, ctx.recipe.resolved_dict()))
        return ExportResult(files={"adapter": str(ctx.adapter_dir)}, sizes={"adapter": dir_size(ctx.adapter_dir)})


def invoking_command() -> str | None:
    """The peftbench command line of this process, when it is one (not a test or a library call)."""
    import shlex

    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("peftbench", "__main__.py"):
        return shlex.join(["peftbench", *sys.argv[1:]])
    return None


ROUGE_METRICS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"))


def card_data(record: RunRecord, recipe: dict):
    """The card's Hub metadata (huggingface_hub's ModelCardData): base model, library, tags, dataset, and the
    fine-tuned model's ROUGE as ``model-index`` results (EvalResult), which the Hub shows as an evaluation
    table and papers-with-code style leaderboards read."""
    from huggingface_hub import EvalResult, ModelCardData

    model, method, dataset = recipe.get("model", {}), recipe.get("method", {}), recipe.get("dataset", {})
    data_id = str(dataset.get("path") or dataset.get("name"))
    split = record.meta_info.dataset_info.eval_split
    scores = record.eval.get("finetuned")
    results = [
        EvalResult(task_type="summarization", task_name="Dialogue summarisation", dataset_type=data_id,
                   dataset_name=str(dataset.get("name") or data_id), dataset_split=split, metric_type=key,
                   metric_name=label, metric_value=round(scores.rouge(key), 2),
                   metric_args={"use_stemmer": True, "scale": "percent", "n": scores.n},
                   source_name="peftbench", source_url="https://pypi.org/project/peftbench/")
        for key, label in ROUGE_METRICS if scores is not None
    ]
    return ModelCardData(
        base_model=model.get("name"), library_name="peft", tags=["peftbench", str(method.get("name")), "summarization"],
        datasets=[data_id], model_name=f"{Path(str(model.get('name'))).stem} {method.get('name')} adapter (peftbench)",
        eval_results=results or None)


def model_card(record: RunRecord, recipe: dict) -> str:
    """README.md for the adapter directory: Hub metadata with ``model-index`` results, then what was trained on
    what, how, and how it scored (peft writes a template README.md that says none of this)."""
    from huggingface_hub import ModelCard

    model, method = recipe.get("model", {}), recipe.get("method", {})
    dataset = recipe.get("dataset", {})
    evals = record.eval
    rows = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | n |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, key in (("base model", "baseline"), ("fine-tuned", "finetuned")):
        if key in evals:
            e = evals[key]
            rows.append(f"| {label} | {e.rouge1:.2f} | {e.rouge2:.2f} | {e.rougeL:.2f} | {e.rougeLsum:.2f} | {e.n} |")
    train = record.train_info
    split = record.meta_info.dataset_info.eval_split or "?"
    command = invoking_command()
    parts = [
        f"# {method.get('name')} adapter for {model.get('name')}\n",
        f"Trained with [peftbench](https://pypi.org/project/peftbench/): method `{method.get('name')}` on "
        f"`{dataset.get('path') or dataset.get('name')}`, {train.steps} optimiser steps "
        f"({train.num_trainable_params or 0:,} trainable parameters, "
        f"{train.trainable_percent}% of the model).\n",
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
    return str(ModelCard("---\n" + card_data(record, recipe).to_yaml() + "\n---\n\n" + "\n".join(parts)))


@hookimpl
def peftbench_register_exporters(register):
    register(AdapterExporter)
