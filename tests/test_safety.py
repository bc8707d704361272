"""Safety: a recipe cannot make peftbench import code; remote code and pickled weights stay off;
PEFTBENCH_PLUGINS picks which third-party plugins load."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import yaml

from peftbench.cli import main
from peftbench.api import MethodPlugin
from peftbench.errors import PeftbenchError
from peftbench.api import hookimpl
from peftbench.host import ENTRY_POINT_GROUP, Host, make_plugin_manager

PROBE = "peftbench_import_probe"


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """An importable package that leaves a marker file when imported."""
    marker = tmp_path / "imported"
    package = tmp_path / "site" / PROBE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (package / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    sys.modules.pop(PROBE, None)


@pytest.mark.parametrize("overrides", [
    [f"method.name={PROBE}"], [f"method.name={PROBE}.evil:Plugin"], [f"dataset.name={PROBE}.evil"],
    [f"trainer.name={PROBE}"], [f"exporters.0.name={PROBE}:export"], [f"model.name=pkg:{PROBE}/m.gguf"],
    [f"model.name=pkg:{PROBE}.evil/m.gguf"],
    [f"method.r=!!python/object/apply:{PROBE}.evil.run []"],
])
def test_recipes_name_plugins_never_import_paths(write_recipe, probe_package, capsys, overrides):
    assert main(["validate", str(write_recipe()), *overrides]) == 2
    assert "error:" in capsys.readouterr().out
    assert not probe_package.exists() and PROBE not in sys.modules


def test_yaml_tags_in_a_recipe_file_are_not_executed(tmp_path, probe_package, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: !!python/object/apply:{PROBE}.evil.run []\n")
    assert main(["validate", str(path)]) == 2
    assert "is not valid YAML" in capsys.readouterr().out
    assert not probe_package.exists()


def test_remote_code_stays_off_and_weights_come_from_safetensors(write_recipe, tmp_path, monkeypatch):
    """Every from_pretrained call of a run passes trust_remote_code=False, and models use_safetensors=True."""
    import transformers

    calls = []

    def spy(cls_name, original):
        def from_pretrained(*args, **kwargs):
            calls.append((cls_name, kwargs))
            return original(*args, **kwargs)
        return from_pretrained

    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        monkeypatch.setattr(cls, "from_pretrained", spy(cls_name, cls.from_pretrained))
    recipe = write_recipe({"name": "lora", "r": 2}, evaluation={"baseline": False, "max_samples": 1, "max_new_tokens": 2})
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run"), "trainer.max_steps=1"]) == 0

    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kwargs.get("trust_remote_code", False) is False for _, kwargs in calls), calls
    assert all(kwargs["use_safetensors"] is True for name, kwargs in calls if name == "AutoModelForCausalLM")

    from peftbench.pipeline.recipe import load_recipe

    assert load_recipe(recipe).recipe.model.trust_remote_code is False
    assert load_recipe(recipe, ["model.trust_remote_code=true"]).recipe.model.trust_remote_code is True


def test_a_recipe_file_cannot_turn_remote_code_on(write_recipe, tmp_path, capsys):
    """Issue 17, case 13: only the command line may run a model's own code, with a warning naming it."""
    import yaml

    recipe = write_recipe({"name": "lora", "r": 2})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["trust_remote_code"] = True
    shared = tmp_path / "from_someone.yaml"
    shared.write_text(yaml.safe_dump(raw))
    for command in ("validate", "run"):
        assert main([command, str(shared), "--output-dir" if command == "run" else "trainer.max_steps=1",
                     *([str(tmp_path / "run")] if command == "run" else [])]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "a recipe file cannot make peftbench run a model's own code" in out and "model.trust_remote_code=true" in out
    assert not (tmp_path / "run").exists()

    (raw["model"]).pop("trust_remote_code")
    shared.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(shared), "model.trust_remote_code=true"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: model.trust_remote_code=true: transformers will import and run the Python files in" in out


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_model

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    with pytest.raises(PeftbenchError) as err:
        load_model(str(pickled), resolve_policy())
    assert "has no .safetensors weights" in err.value.problem and "safe_serialization=True" in err.value.fix


# --- PEFTBENCH_PLUGINS --------------------------------------------------------------------------


def _plugin_module(method_name: str) -> types.ModuleType:
    method = type(f"Method_{method_name}", (MethodPlugin,), {"name": method_name})
    module = types.ModuleType(f"fake_{method_name}")

    @hookimpl
    def peftbench_register_methods(register):
        register(method)

    module.peftbench_register_methods = peftbench_register_methods
    return module


class FakeEntryPoint:
    """What importlib.metadata gives for an installed plugin; records whether it was loaded."""

    def __init__(self, name: str):
        self.name, self.value, self.group = name, f"{name}_package.plugin", ENTRY_POINT_GROUP
        self.loaded = False

    def load(self):
        self.loaded = True
        return _plugin_module(f"{self.name}_method")


@pytest.fixture
def installed_plugins(monkeypatch):
    import importlib.metadata

    entry_points = {"alpha": FakeEntryPoint("alpha"), "beta": FakeEntryPoint("beta")}

    def fake_entry_points(**selection):
        return list(entry_points.values()) if selection.get("group") == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.delenv("PEFTBENCH_LOAD_ENTRY_POINTS", raising=False)
    monkeypatch.delenv("PEFTBENCH_PLUGINS", raising=False)
    return entry_points


@pytest.mark.parametrize("setting, loaded", [(None, {"alpha", "beta"}), ("beta", {"beta"}), (" alpha , beta ", {"alpha", "beta"}),
                                              ("", set())])
def test_peftbench_plugins_restricts_third_party_plugins(installed_plugins, monkeypatch, setting, loaded):
    if setting is not None:
        monkeypatch.setenv("PEFTBENCH_PLUGINS", setting)
    host = Host(make_plugin_manager())
    assert {name for name, ep in installed_plugins.items() if ep.loaded} == loaded, "excluded plugins are never imported"
    assert {n.removesuffix("_method") for n in host.methods.names() if n.endswith("_method")} == loaded
    assert {"lora", "qlora"} <= set(host.methods.names()), "built-in plugins always load"


def test_a_misspelt_plugin_name_in_peftbench_plugins_is_one_line(installed_plugins, monkeypatch, capsys):
    """Issue 17, case 12: it was silently ignored."""
    from peftbench.host import reset_host

    monkeypatch.setenv("PEFTBENCH_PLUGINS", "alpha,betta")
    reset_host()
    try:
        assert main(["methods"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "PEFTBENCH_PLUGINS names 'betta', which is not installed. Did you mean 'beta'?" in out
        assert "installed third-party plugins: alpha, beta" in out
    finally:
        reset_host()


def test_a_plugin_that_fails_on_import_is_skipped_with_a_warning(installed_plugins, monkeypatch, capsys):
    """Issue 17, case 12: a broken third-party plugin broke every command, `peftbench plugins` too."""
    from peftbench.host import reset_host

    def broken():
        raise ImportError("No module named 'torchtune_extras'")

    installed_plugins["beta"].load = broken
    reset_host()
    try:
        assert main(["plugins"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "warning: plugin 'beta' (beta_package.plugin) failed to load and is skipped" in out
        assert "broken plugin beta: ImportError: No module named 'torchtune_extras'" in out
        assert "alpha_method" in out  # the others still load
    finally:
        reset_host()


def test_a_duplicate_plugin_name_is_one_line(monkeypatch, capsys):
    import peftbench.host as host

    class Again(MethodPlugin):
        name = "lora"

    class Dup:
        @hookimpl
        def peftbench_register_methods(self, register):
            register(Again)

    host._extra_plugins.append(Dup())
    host.reset_host()
    try:
        assert main(["methods"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "method 'lora' registered twice" in out and "Fix: uninstall one of the two" in out and "Traceback" not in out
    finally:
        host._extra_plugins.clear()
        host.reset_host()
