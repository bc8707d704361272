"""`peftbench evaluate RUN_DIR evaluation.key=value`: a finished run's adapter scored again with other
settings, without training, as a user choosing a decoding setting would run it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.files import read_json
from peftbench.testing import read_jsonl, tiny_recipe


def finished_run(tmp_path_factory, model_dir, data_dir, name: str, **evaluation) -> Path:
    from peftbench.pipeline.recipe import validate_recipe
    from peftbench.pipeline.runner import run_recipe

    raw = tiny_recipe(model_dir, data_dir, {"name": "lora", "r": 2}, evaluation={"baseline": False, **evaluation})
    raw["trainer"]["max_steps"] = 2
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert run_recipe(validate_recipe(raw), run_dir)["run_info"]["status"] == "success"
    return run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    return finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, "plain")


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Trained as a comparison's search run is: 4 rows carved from train, scored on them."""
    return finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, "search", split="selection", selection_size=4)


def test_beam_search_scores_of_a_finished_run(plain_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    before = read_json(run / "run.json")
    assert main(["evaluate", str(run), "evaluation.num_beams=2", "evaluation.max_new_tokens=6"]) == 0
    out = capsys.readouterr().out
    after = read_json(run / "run.json")
    key = "finetuned[max_new_tokens=6,num_beams=2]"
    scores = after["eval"][key]
    assert scores["n"] == before["eval"]["finetuned"]["n"] and scores["settings"]["num_beams"] == 2
    assert scores["settings"]["max_new_tokens"] == 6 and 0 <= scores["rouge1"] <= 100
    assert after["eval"]["finetuned"] == before["eval"]["finetuned"], "the run's own scores stay"
    assert {k: v for k, v in after.items() if k not in ("eval", "run_info")} == \
        {k: v for k, v in before.items() if k not in ("eval", "run_info")}
    (entry,) = after["run_info"]["evaluations_after_run"]
    assert entry["key"] == key and entry["overrides"] == ["evaluation.num_beams=2", "evaluation.max_new_tokens=6"]
    predictions = read_jsonl(run / f"predictions_{key}.jsonl")
    assert len(predictions) == scores["n"] and {"id", "prediction", "reference"} <= set(predictions[0])
    assert "fine-tuned, max_new_tokens=6,num_beams=2" in (run / "report.md").read_text()
    assert f"{scores['rouge1']:.2f}" in out and "num_beams" in out  # the terminal table (its cells wrap)


def test_a_search_run_is_scored_on_its_selection_split_and_then_on_validation(search_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(search_run, run)
    trained_selection = [r["id"] for r in read_jsonl(run / "predictions_finetuned.jsonl")]
    assert main(["evaluate", str(run), "evaluation.num_beams=2"]) == 0  # the run's own split: selection
    beams = read_jsonl(run / "predictions_finetuned[num_beams=2].jsonl")
    assert [r["id"] for r in beams] == trained_selection, "the same held-out rows the run was scored on"
    assert main(["evaluate", str(run), "evaluation.split=validation"]) == 0
    record = read_json(run / "run.json")
    assert record["eval"]["finetuned[split=validation]"]["settings"]["split"] == "validation"
    capsys.readouterr()


def one_line_error(capsys) -> str:
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("overrides,expected", [
    ([], "nothing to change"),
    (["method.r=4"], "override 'method.r=4' is not one `peftbench evaluate` takes"),
    (["evaluation.selection_size=2"], "is not one `peftbench evaluate` takes"),
    (["evaluation.split=selection"], "trained on the whole train split"),
])
def test_bad_input_is_one_line_and_writes_nothing(plain_run, overrides, expected, capsys):
    before = {p: p.read_bytes() for p in plain_run.rglob("*") if p.is_file()}
    assert main(["evaluate", str(plain_run), *overrides]) == 2
    assert expected in one_line_error(capsys)
    assert {p: p.read_bytes() for p in plain_run.rglob("*") if p.is_file()} == before
