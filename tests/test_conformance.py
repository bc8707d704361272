"""The conformance suite (peftbench.testing.MethodConformance) for every built-in method and for
the example external plugin in examples/peftbench-layernorm."""

from peftbench.testing import MethodConformance


class TestLora(MethodConformance):
    method = {"name": "lora"}


class TestQlora(MethodConformance):
    method = {"name": "qlora"}


class TestPrefixTuning(MethodConformance):
    method = {"name": "prefix_tuning", "num_virtual_tokens": 8}


class TestIa3(MethodConformance):
    method = {"name": "ia3"}


class TestIa3On4BitBase(MethodConformance):
    method = {"name": "ia3", "load_in_4bit": True}


class TestBitFit(MethodConformance):
    method = {"name": "bitfit"}


def _example_plugin():
    """The example external plugin, imported from its folder: registered for the tests below without
    `pip install` (peftbench.host.registered), as a plugin author's own tests can do."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "peftbench-layernorm" / "peftbench_layernorm.py"
    spec = importlib.util.spec_from_file_location("peftbench_layernorm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestExampleLayerNormPlugin(MethodConformance):
    plugins = (_example_plugin(),)
    method = {"name": "ln_tuning"}
