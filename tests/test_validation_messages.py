"""Bad input: every problem named in one line with a fix, exit code 2, nothing written."""

from __future__ import annotations

import pytest
import yaml

from peftbench.cli import main
from peftbench.api import Capabilities, ExporterPlugin, MethodPlugin
from peftbench.api import hookimpl
from peftbench.host import registered


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and " Fix: " in lines[0] and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.learning_rat=1e-4"], "trainer.learning_rat: unknown key. Did you mean 'learning_rate'?"),
    (["model.nmae=x"], "model.nmae: unknown key. Did you mean 'name'?"),
    (["seeed=1"], "seeed: unknown key. Did you mean 'seed'?"),
    (["trainer.batch_size=four"], "trainer.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'four')"),
    (["evaluation.baseline=maybe"], "evaluation.baseline: Input should be a valid boolean"),
    (["trainer.batch_size=0"], "trainer.batch_size: Input should be greater than 0 (got 0)"),
    (["method.dropout=1.5"], "method.dropout: Input should be less than 1 (got 1.5)"),
    (["evaluation.split=train"], "evaluation.split: Input should be 'test', 'validation' or 'selection' (got 'train')"),
    (["method.name=lorra"], "method.name: unknown method 'lorra'. Did you mean 'lora'? Known: "),
    (["exporters.0.name=adaptor"], "exporters.0.name: unknown exporter 'adaptor'. Did you mean 'adapter'?"),
    (["model.name=./no/such/model"], "model.name: './no/such/model' does not exist"),
    (["dataset.path=/no/such/data.jsonl"], "dataset.path: '/no/such/data.jsonl' does not exist"),
    (["model.name=pkg:no_such_package/m.gguf"], "model.name: package 'no_such_package' named by 'pkg:no_such_package/m.gguf' is not installed"),
    (["model=3"], "model: must be a section of key: value lines (got 3)"),
    (["exporters=[adapter]"], "exporters.0: must be a section of key: value lines (got 'adapter')"),
    (["prompt.template=no placeholder"], "prompt.template: Value error, must contain the placeholder {dialogue}"),
    # Issue 17, case 7: transformers checks these only when training starts, after run.json is written.
    (["trainer.optim=bogus"], "trainer.optim: Value error, unknown transformers optimiser 'bogus'; known: adamw_torch,"),
    (["trainer.save_steps=7", "trainer.logging_steps=5"], "trainer.save_steps: Value error, must be a multiple of "
                                                           "trainer.logging_steps (5)"),
    (["trainer.lr_scheduler=cosin"], "trainer.lr_scheduler: Value error, unknown transformers scheduler 'cosin'; "
                                     "did you mean 'cosine'?"),
])
def test_each_kind_of_problem_is_named(write_recipe, capsys, overrides, expected):
    assert main(["validate", str(write_recipe()), *overrides]) == 2
    assert expected in _one_error_line(capsys)


def test_every_problem_in_one_message_and_nothing_written(write_recipe, tmp_path, capsys):
    bad = ["trainer.learning_rat=1e-4", "trainer.batch_size=-1", "method.name=lorra", "dataset.path=/no/such/dir",
           "model.name=./missing", "seeed=3", "prompt=7"]
    run_dir = tmp_path / "run"
    assert main(["run", str(write_recipe()), "--output-dir", str(run_dir), *bad]) == 2
    line = _one_error_line(capsys)
    for part in ("seeed: unknown key. Did you mean 'seed'?", "prompt: must be a section", "unknown method 'lorra'",
                 "trainer.learning_rat: unknown key", "trainer.batch_size: Input should be greater than 0",
                 "dataset.path: '/no/such/dir' does not exist", "model.name: './missing' does not exist"):
        assert part in line, part
    assert not run_dir.exists()


@pytest.mark.parametrize("argv, expected", [
    (["validate", "no/such/recipe.yaml"], "recipe file 'no/such/recipe.yaml' does not exist."),
    (["validate", "{recipe}", "foo"], "override 'foo' has no '='."),
    (["validate", "{recipe}", "seed.value=1"], "override 'seed.value': 'seed' is a value, not a section."),
    (["validate", "{recipe}", "exporters.0.name.x=1"], "override 'exporters.0.name.x': 'exporters.0.name' is a value"),
    (["validate", "{recipe}", "exporters.4.name=adapter"], "override 'exporters.4.name': '4' is not an index of a list of 1."),
    (["validate", "{recipe}", "method..r=4"], "override key 'method..r' is malformed."),
    (["validate", "{recipe}", "method.target_modules=[q_proj"], "override 'method.target_modules=[q_proj': the value is not valid YAML"),
    (["validate", "{recipe}", "method.r=!!python/object/apply:os.system [true]"], "the value is not valid YAML"),
])
def test_bad_command_lines(write_recipe, capsys, argv, expected):
    argv = [a.replace("{recipe}", str(write_recipe())) for a in argv]
    assert main(argv) == 2
    assert expected in _one_error_line(capsys)


@pytest.mark.parametrize("content, expected", [
    ("model: [unclosed\nseed: 1\n", "is not valid YAML at line 2, column 5: expected ',' or ']'"),
    ("- just\n- a list\n", "must be a YAML mapping of sections"),
    ("x: !!python/object/apply:os.system ['echo pwned']\n", "is not valid YAML"),
    (b"\xff\xfe binary", "is not UTF-8 text"),
])
def test_unreadable_recipe_files(tmp_path, capsys, content, expected):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["validate", str(path)]) == 2
    assert expected in _one_error_line(capsys)


def test_markup_in_user_input_is_printed_literally(write_recipe, capsys):
    assert main(["validate", str(write_recipe()), "method.[/bold]=1", "model.name=./a\nb"]) == 2
    line = _one_error_line(capsys)
    assert "method.[/bold]: unknown key" in line and "'./a b' does not exist" in line


class NoMerge(MethodPlugin):
    """A method that cannot be merged into the base weights (what the exporter check reads)."""

    name = "test_no_merge"
    capabilities = Capabilities(mergeable=False)


class NeedsMerge(ExporterPlugin):
    name = "test_needs_merge"
    requires = ("mergeable",)


class IncompatiblePlugins:
    @staticmethod
    @hookimpl
    def peftbench_register_methods(register):
        register(NoMerge)

    @staticmethod
    @hookimpl
    def peftbench_register_exporters(register):
        register(NeedsMerge)


@pytest.mark.parametrize("exporter", ["test_needs_merge", "merged", "gguf"])
def test_non_mergeable_method_with_a_merging_exporter(write_recipe, tmp_path, capsys, exporter):
    with registered(IncompatiblePlugins) as host:
        if exporter not in host.exporters:
            pytest.skip(f"exporter {exporter} is not installed")
        recipe = write_recipe({"name": "test_no_merge"}, exporters=[{"name": "adapter"}, {"name": exporter}])
        assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert f"exporters.1: '{exporter}' needs a method that is mergeable" in line
    assert "'test_no_merge' is not" in line and "remove this exporter or pick another method" in line
    assert not (tmp_path / "run").exists()


def test_a_valid_recipe_passes(write_recipe, capsys):
    assert main(["validate", str(write_recipe())]) == 0
    assert capsys.readouterr().out.startswith("ok ")


def test_model_references_that_are_not_models_are_named_before_anything_runs(write_recipe, tmp_path, capsys):
    """Issue 17, case 9: each of these was a traceback after run.json was written."""
    from peftbench.pipeline.modeling import OFFLINE_MODEL, resolve_package_file

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "text.gguf").write_text("not a model")
    (tmp_path / "cut.gguf").write_bytes(resolve_package_file(OFFLINE_MODEL).read_bytes()[:100_000])
    cases = {
        "empty": "is a folder without config.json, not a transformers model",
        "notes": "is a folder without config.json, not a transformers model",
        "config_only": "has no .safetensors weights",
        "text.gguf": "is not a GGUF file (it does not start with the GGUF magic bytes)",
        "cut.gguf": "is not a complete GGUF file",
    }
    for name, expected in cases.items():
        run_dir = tmp_path / f"run-{name}"
        assert main(["run", str(write_recipe()), f"model.name={tmp_path / name}", "--output-dir", str(run_dir)]) == 2
        assert expected in _one_error_line(capsys), name
        assert not run_dir.exists(), name


def test_data_that_cannot_be_used_is_named_and_leaves_no_run_directory(write_recipe, tiny_data_dir, tmp_path, capsys):
    """Issue 17, case 8: tracebacks (StopIteration, DatasetGenerationError, KeyError 'validation') or a
    run.json left behind, before."""
    good = (tiny_data_dir / "train.jsonl").read_text().splitlines()[0]
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train.jsonl").write_text(good + "\n")
    cases = {
        "empty.jsonl": ("", "is empty."),
        "semicolons.csv": ("id;dialogue;summary\n1;A: hi;A greets.\n", "looks ';'-separated"),
        "broken.jsonl": (good + "\n{not json\n", "line 2 of"),
        "blank.jsonl": ('{"id": "1", "dialogue": " ", "summary": "x"}\n', "every row of the train split has an empty dialogue"),
        "no_column.jsonl": ('{"id": "1", "text": "A: hi", "summary": "x"}\n', "has no column(s) ['dialogue']"),
        "only_train": (None, "the dataset has only a train split"),
    }
    for name, (text, expected) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        run_dir = tmp_path / f"run-{name}"
        code = main(["run", str(write_recipe()), "dataset.name=samsum", f"dataset.path={tmp_path / name}",
                     "--output-dir", str(run_dir)])
        out = capsys.readouterr().out
        assert code == 2, (name, out)
        error = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and expected in error[0] and "Traceback" not in out, (name, out)
        assert not run_dir.exists(), name
    run_dir = tmp_path / "run-misspelt"
    assert main(["run", str(write_recipe()), "dataset.max_samples={trian: 3}", "--output-dir", str(run_dir)]) == 2
    assert "unknown split(s) ['trian']" in capsys.readouterr().out and not run_dir.exists()


def test_target_modules_the_model_does_not_have_are_one_line(write_recipe, tmp_path, capsys):
    """Issue 17, case 7: peft's ValueError was a traceback."""
    run_dir = tmp_path / "run"
    code = main(["run", str(write_recipe({"name": "lora", "r": 2, "target_modules": ["q_proj", "no_such_proj"]},
                                         evaluation={"max_samples": 1})),
                 "--output-dir", str(run_dir)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "method.target_modules names ['no_such_proj'], which LlamaForCausalLM does not have" in out, out
    assert "Fix: use names of its modules, e.g." in out and "q_proj" in out and "Traceback" not in out
    assert not run_dir.exists()  # found before the baseline evaluation: the run never started
