"""Property-based: malformed recipes and overrides never produce a traceback.

Random YAML values, keys and types go into every section of a valid recipe, and random strings go in
as overrides. ``peftbench validate`` (through ``peftbench.cli.main``) must answer with exit code 0 and
an ``ok`` line, or exit code 2 and one ``error: ... Fix: ...`` line; ``peftbench run`` on an invalid
recipe must also exit 2 and write nothing. Validation only: no model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftbench.cli import main
from peftbench.host import get_host
from peftbench.pipeline.recipe import EvaluationSection, ModelSection, PromptSection, Recipe

# A valid recipe whose model is a hub id: validation accepts it without the network or a model file.
BASE = {
    "seed": 1,
    "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"name": "chatsum"},
    "prompt": {"max_source_tokens": 128, "max_target_tokens": 32},
    "method": {"name": "lora", "r": 4},
    "trainer": {"name": "hf", "max_steps": 2, "batch_size": 2},
    "evaluation": {"batch_size": 2, "max_samples": 4},
    "exporters": [{"name": "adapter"}],
}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _plugin_fields(section: str) -> list[str]:
    host = get_host()
    registry = {"dataset": host.datasets, "method": host.methods, "trainer": host.trainers,
                "exporters": host.exporters}[section]
    return sorted({"name", *(f for _, p in registry.items() for f in p.Options.model_fields)})


def section_keys() -> dict[str, list[str]]:
    """Real field names per section, so mutations hit real keys (with wrong values) as often as made-up ones."""
    return {
        "": list(Recipe.model_fields),
        "model": list(ModelSection.model_fields),
        "prompt": list(PromptSection.model_fields),
        "evaluation": list(EvaluationSection.model_fields),
        **{s: _plugin_fields(s) for s in ("dataset", "method", "trainer", "exporters")},
    }


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["lora", "qlora", "hf", "adapter", "chatsum", "samsum", "./no/such/file.jsonl",
                     "pkg:no_such_pkg/x.gguf", "pkg:json/x.gguf", "[/bold]", "{dialogue}", "1e-3", "~", "auto",
                     "~\x00x.jsonl", "./a\x00b", "/" + "x" * 300 + ".gguf", "a\nb", "\x1b[31m"]),
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 3)), children, max_size=3)),
    max_leaves=8,
)


@st.composite
def mutated_recipes(draw) -> dict:
    keys = section_keys()
    recipe = yaml.safe_load(yaml.safe_dump(BASE))  # a deep copy
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(keys)))
        key = draw(st.one_of(st.sampled_from(keys[section]), st.text(min_size=1, max_size=12)))
        action = draw(st.sampled_from(["set", "set", "set", "delete", "replace_section"]))
        if section == "":
            target = recipe
        elif section == "exporters":
            exporters = recipe.get("exporters")
            target = exporters[0] if isinstance(exporters, list) and exporters and isinstance(exporters[0], dict) else None
        else:
            target = recipe.get(section) if isinstance(recipe.get(section), dict) else None
        if action == "replace_section" and section:
            recipe[section] = draw(yaml_values)
        elif target is not None and action == "delete":
            target.pop(key, None)
        elif target is not None:
            target[key] = draw(yaml_values)
    return recipe


override_keys = st.one_of(
    st.sampled_from(["seed", "model.name", "method.r", "method.name", "trainer.learning_rate", "trainer.learning_rat",
                     "exporters.0.name", "exporters.3.name", "exporters.x", "seed.x", "evaluation.batch_size",
                     "prompt.template", "dataset.path", "method.target_modules"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="="), max_size=15),
)
override_values = st.one_of(st.sampled_from(["", "0", "-1", "null", "[", "]", "{a: 1", "[q_proj, v_proj]", "'x",
                                             "!!python/object:os.system", "true", "1e999", "nan"]),
                            st.text(max_size=15))
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
              st.text(max_size=20)).filter(lambda s: not s.startswith("-")),  # '-x' is argparse's business
    max_size=3,
)


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


def _assert_clean_answer(code: int, output: str) -> None:
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    if code == 0:
        assert lines and lines[0].startswith("ok "), output
    else:
        assert code == 2, output
        assert len(lines) == 1, f"the error must be one line, got: {output!r}"
        assert lines[0].startswith("error: ") and " Fix: " in lines[0], output


def _check(recipe_text: str, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(recipe_text, encoding="utf-8")
        code, output = _cli(["validate", str(path), *extra])
        _assert_clean_answer(code, output)
        if code == 2:  # running an invalid recipe fails the same way and writes nothing
            run_dir = Path(tmp) / "run"
            run_code, run_output = _cli(["run", str(path), "--output-dir", str(run_dir), *extra])
            assert run_code == 2 and run_output.strip() == output.strip()
            assert not run_dir.exists()
            assert sorted(p.name for p in Path(tmp).iterdir()) == ["recipe.yaml"]


@SETTINGS
@given(recipe=mutated_recipes())
def test_malformed_sections_give_one_line_errors(recipe):
    _check(yaml.safe_dump(recipe, allow_unicode=True), [])


@SETTINGS
@given(extra=overrides)
def test_random_overrides_give_one_line_errors(extra):
    _check(yaml.safe_dump(BASE), extra)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(text=st.one_of(st.text(max_size=60), yaml_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True))))
def test_random_recipe_files_give_one_line_errors(text):
    _check(text, [])


def test_the_base_recipe_is_valid():
    """The properties above start from a valid recipe, so each failure is the mutation's doing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(BASE))
        code, output = _cli(["validate", str(path)])
    assert code == 0 and output.startswith("ok "), output
