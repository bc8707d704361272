"""Recipes: every shipped recipe validates, overrides reach nested keys, problems are named."""

from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.pipeline.recipe import apply_overrides, load_recipe, read_recipe_file, validate_recipe

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def _is_single_run(path: Path) -> bool:
    return "method" in read_recipe_file(path)


@pytest.mark.parametrize("path", [p for p in RECIPES if _is_single_run(p)], ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    resolved = load_recipe(path)
    assert resolved.method.name == resolved.recipe.method.name


def test_reference_recipe_is_the_lesson_configuration():
    r = load_recipe("recipes/qlora_samsum.yaml")
    m, t = r.method_options, r.trainer_options
    assert r.recipe.model.name == "meta-llama/Llama-3.2-1B-Instruct"
    assert (r.method.name, m.quant_type, m.double_quant, m.compute_dtype) == ("qlora", "nf4", True, "bfloat16")
    assert (m.r, m.alpha, m.target_modules, m.dropout) == (8, 16, ["q_proj", "v_proj"], 0.05)
    assert (t.epochs, t.batch_size, t.grad_accum, t.learning_rate, t.warmup_steps) == (1, 4, 4, 2e-4, 50)
    assert (t.logging_steps, t.save_steps, t.eval_steps, t.optim) == (10, 100, 100, "paged_adamw_8bit")
    assert r.dataset.name == "samsum" and r.dataset_options.path == "knkarthick/samsum"


def test_overrides_set_nested_keys_with_yaml_types():
    raw = {"method": {"name": "lora", "r": 8}, "exporters": [{"name": "adapter"}]}
    out = apply_overrides(raw, ["method.r=16", "trainer.learning_rate=0.001", "evaluation.max_samples=null",
                                "exporters.0.name=adapter", "method.target_modules=[q_proj, k_proj]"])
    assert out["method"]["r"] == 16
    assert out["trainer"]["learning_rate"] == 1e-3
    assert out["evaluation"]["max_samples"] is None
    assert out["method"]["target_modules"] == ["q_proj", "k_proj"]
    assert raw["method"]["r"] == 8, "the original dict is untouched"


def test_overrides_are_validated_like_the_file():
    r = load_recipe("recipes/quickstart.yaml", ["method.r=4", "trainer.epochs=1", "trainer.learning_rate=1e-3"])
    assert r.method_options.r == 4 and r.trainer_options.epochs == 1 and r.trainer_options.learning_rate == 1e-3
    # Switching method keeps the other method's options, which the new one rejects by name.
    with pytest.raises(PeftbenchError, match="method.quant_type: unknown key"):
        load_recipe("recipes/quickstart.yaml", ["method.name=lora"])
    with pytest.raises(PeftbenchError, match=r"method.r: Input should be greater than 0"):
        load_recipe("recipes/quickstart.yaml", ["method.r=0"])


@pytest.mark.parametrize("override, message", [
    ("method.rr=4", "method.rr: unknown key. Did you mean 'r'?"),
    ("trainer.learning_rat=1", "trainer.learning_rat: unknown key. Did you mean 'learning_rate'?"),
    ("method.name=lorra", "unknown method 'lorra'. Did you mean 'lora'?"),
    ("dataset.name=samsun", "unknown dataset 'samsun'. Did you mean 'samsum'?"),
    ("trainer.batch_size=four", "trainer.batch_size: Input should be a valid integer"),
    ("model.name=./no/such/model", "model.name: './no/such/model' does not exist"),
    ("modle.name=x", "modle: unknown key. Did you mean 'model'?"),
    ("prompt.template=no placeholder", "prompt.template: Value error, must contain the placeholder {dialogue}"),
])
def test_problems_are_named_with_a_fix(override, message):
    with pytest.raises(PeftbenchError) as err:
        load_recipe("recipes/quickstart.yaml", [override])
    assert message in err.value.problem
    assert err.value.fix


def test_every_problem_is_reported_at_once():
    raw = read_recipe_file("recipes/quickstart.yaml")
    raw = apply_overrides(raw, ["method.rr=4", "trainer.learning_rat=1", "evaluation.batch_size=0"])
    with pytest.raises(PeftbenchError) as err:
        validate_recipe(raw)
    for part in ("method.rr", "trainer.learning_rat", "evaluation.batch_size"):
        assert part in err.value.problem


def test_cli_validate_prints_one_line_and_exits_2(capsys, tmp_path):
    assert main(["validate", "recipes/quickstart.yaml", "method.rr=4"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and "Fix:" in out and "Traceback" not in out
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert main(["validate", "recipes/quickstart.yaml"]) == 0
