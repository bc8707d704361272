"""The whole pipeline on a tiny model: files written, record layout, adapter round trip."""

import json
import math
import statistics

import pytest
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
    # The forgetting probe: the loss on the built-in general texts before and after, their change and its paired SE.
    forgetting = record["forgetting"]
    assert forgetting["texts"] == "built-in" and forgetting["n_texts"] == 40 and not forgetting.get("notes")
    base, tuned = forgetting["base"], forgetting["finetuned"]
    assert len(base["per_text"]) == len(tuned["per_text"]) == 40 and base["tokens"] == tuned["tokens"] > 0
    assert base["per_text"] != tuned["per_text"], "training changed the model"
    assert forgetting["change"] == tuned["loss"] - base["loss"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    diffs = [b - a for a, b in zip(base["per_text"], tuned["per_text"])]
    assert forgetting["change_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(40))
    report = (run_dir / "report.md").read_text()
    assert "Forgetting: language-modelling loss" in report
    assert f"| base model | {base['loss']:.4f} | {base['perplexity']:.2f} | {base['tokens']} |" in report
    assert f"| change | {forgetting['change']:+.4f} ± {forgetting['change_se']:.4f} |" in report
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


def test_forgetting_without_a_baseline_scores_the_recipes_texts_after_training_only(tmp_path, write_recipe, capsys):
    texts = tmp_path / "general.jsonl"
    texts.write_text('{"text": "The river runs to the sea through a wide green valley."}\n'
                     '{"text": "Bread is made from flour, water, salt and yeast."}\n', encoding="utf-8")
    recipe = write_recipe({"name": "lora", "r": 2}, evaluation={"baseline": False, "forgetting_texts": str(texts)})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 0
    forgetting = read_json(run_dir / "run.json")["forgetting"]
    assert forgetting["texts"] == str(texts) and forgetting["n_texts"] == 2
    assert "base" not in forgetting and "change" not in forgetting and len(forgetting["finetuned"]["per_text"]) == 2
    report = (run_dir / "report.md").read_text()
    assert "| fine-tuned |" in report.split("Forgetting:")[1] and "| change |" not in report.split("Forgetting:")[1]

    # The probe off: nothing recorded, nothing reported; a texts file that is not there is a recipe error.
    capsys.readouterr()
    off = tmp_path / "off"
    assert main(["run", str(recipe), "--output-dir", str(off), "trainer.max_steps=1", "evaluation.forgetting=false"]) == 0
    assert "forgetting" not in read_json(off / "run.json") and "Forgetting" not in (off / "report.md").read_text()
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "bad"),
                 f"evaluation.forgetting_texts={tmp_path / 'missing.jsonl'}"]) == 2
    assert "evaluation.forgetting_texts" in capsys.readouterr().out and not (tmp_path / "bad").exists()


def test_a_model_the_forgetting_probe_cannot_score_is_a_note_not_a_failed_run(tmp_path, write_recipe, monkeypatch):
    from peftbench.pipeline import runner

    def refuses(model, tokenizer, texts):
        raise RuntimeError("this forward takes no input_ids")

    monkeypatch.setattr(runner, "text_loss", refuses)
    run_dir = tmp_path / "run"
    assert main(["run", str(write_recipe({"name": "lora", "r": 2})), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 0
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "success" and "base" not in record["forgetting"]
    assert record["forgetting"]["notes"] == [f"{which}: not scored (RuntimeError: this forward takes no input_ids)"
                                             for which in ("base", "finetuned")]
    assert "- finetuned: not scored (RuntimeError" in (run_dir / "report.md").read_text()
