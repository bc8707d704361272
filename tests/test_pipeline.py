"""The whole pipeline on a tiny model: files written, record layout, adapter round trip."""

import json

import torch
import yaml

from peftbench.cli import main
from peftbench.files import read_json
from peftbench.testing import read_jsonl


def test_run_writes_a_complete_run_directory(tmp_path, write_recipe, tiny_model_dir):
    recipe = write_recipe({"name": "lora", "r": 4})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=3"]) == 0

    record = read_json(run_dir / "run.json")
    assert set(record) >= {"run_info", "train_info", "meta_info", "eval"}
    assert record["run_info"]["status"] == "success"
    assert all(st["status"] == "success" for st in record["run_info"]["stages"].values())
    for which in ("baseline", "finetuned"):
        scores = record["eval"][which]
        assert set(scores) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "n"}
        assert scores["n"] == 4
    train = record["train_info"]
    assert train["steps"] == 3 and train["tokens_seen"] > 0
    assert 0 < train["num_trainable_params"] < train["num_total_params"]
    assert train["file_size"] > 0
    assert record["meta_info"]["package_info"]["transformers-version"]
    assert record["run_info"]["recipe"]["trainer"]["max_steps"] == 3  # the resolved recipe, overrides applied
    assert (run_dir / "recipe.yaml").is_file() and "ROUGE-1" in (run_dir / "report.md").read_text()
    # The adapter carries a model card with Hub metadata, the scores of this run and its recipe.
    card = (run_dir / "adapter" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert f"| fine-tuned | {record['eval']['finetuned']['rouge1']:.2f} |" in card
    # ... and the fine-tuned scores as Hub model-index results, as huggingface_hub reads them back.
    from huggingface_hub import ModelCard

    results = {r.metric_type: r for r in ModelCard(card).data.eval_results}
    assert set(results) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for metric, result in results.items():
        assert result.metric_value == round(record["eval"]["finetuned"][metric], 2)
        assert result.task_type == "summarization" and result.dataset_split == record["meta_info"]["dataset_info"]["eval_split"]
    assert "trainer:" in card and "max_steps: 3" in card
    predictions = read_jsonl(run_dir / "predictions_finetuned.jsonl")
    assert len(predictions) == 4 and {"id", "prediction", "reference"} <= set(predictions[0])

    # The adapter loads with plain peft and reproduces the trained model's outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training moved the adapter off its zero init"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter").eval()
    torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    assert not torch.allclose(base.get_base_model()(ids).logits if hasattr(base, "get_base_model") else
                              AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits, model(ids).logits)


def test_finished_run_is_not_overwritten(tmp_path, write_recipe, capsys):
    recipe = write_recipe({"name": "lora", "r": 2})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 0
    before = (run_dir / "run.json").read_text()
    capsys.readouterr()
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 2
    assert "holds a finished run" in capsys.readouterr().out
    assert (run_dir / "run.json").read_text() == before


def test_bad_input_writes_nothing(tmp_path, write_recipe):
    recipe = write_recipe({"name": "lora", "rank": 2})
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
