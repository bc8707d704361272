"""Plugins registered the way a third party would are listed and usable in a recipe."""

import pytest

from peftbench.cli import main
from peftbench.api import DatasetPlugin, LoadedDataset, MethodPlugin, Options
from peftbench.api import hookimpl
from peftbench.host import get_host, registered
from peftbench.pipeline.recipe import validate_recipe
from peftbench.testing import tiny_recipe


class ReversedChatsum(DatasetPlugin):
    """The bundled set with the dialogue turns in reverse order (a toy third-party dataset)."""

    name = "reversed_chatsum"

    def load(self, options, seed):
        from peftbench_plugins.datasets import Chatsum, ChatsumOptions

        data = Chatsum().load(ChatsumOptions(max_samples={"train": 8, "validation": 2, "test": 2}), seed)
        flipped = {k: v.map(lambda ex: {"dialogue": "\n".join(reversed(ex["dialogue"].splitlines()))}) for k, v in data.splits.items()}
        return LoadedDataset(type(data.splits)(flipped), data.stats)


class ToyPlugin:
    @hookimpl
    def peftbench_register_datasets(self, register):
        register(ReversedChatsum)


def test_registered_plugin_is_listed_and_then_gone(capsys):
    with registered(ToyPlugin()):
        assert "reversed_chatsum" in get_host().datasets
        assert main(["plugins"]) == 0
        assert "reversed_chatsum" in capsys.readouterr().out
    assert "reversed_chatsum" not in get_host().datasets


def test_registered_dataset_runs_in_a_recipe(tmp_path, tiny_model_dir, tiny_data_dir):
    from peftbench.pipeline.runner import run_recipe

    raw = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "lora", "r": 2})
    raw["dataset"] = {"name": "reversed_chatsum"}
    raw["trainer"]["max_steps"] = 1
    with registered(ToyPlugin()):
        record = run_recipe(validate_recipe(raw), tmp_path / "run")
    assert record["run_info"]["status"] == "success"
    assert record["meta_info"]["dataset_info"]["rows"] == {"train": 8, "validation": 2, "test": 2}


def test_duplicate_names_are_refused():
    class Again(MethodPlugin):
        name = "lora"

    class Dup:
        @hookimpl
        def peftbench_register_methods(self, register):
            register(Again)

    with pytest.raises(ValueError, match="method 'lora' registered twice"):
        with registered(Dup()):
            pass


def test_hook_without_spec_is_rejected():
    class Typo:
        @hookimpl
        def peftbench_register_method(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="peftbench_register_method"):
        with registered(Typo()):
            pass


def test_every_hook_is_documented():
    from peftbench import api

    for name in dir(api):
        if name.startswith("peftbench_"):
            assert getattr(api, name).__doc__, f"{name} has no docstring"


def test_every_builtin_option_has_help_text():
    host = get_host()
    for registry in (host.datasets, host.methods, host.trainers, host.exporters):
        for name, plugin in registry.items():
            for field_name, field in plugin.Options.model_fields.items():
                assert field.description, f"{registry.kind} {name}: option {field_name} has no description"
