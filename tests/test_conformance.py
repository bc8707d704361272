"""The conformance suite (peftbench.testing.MethodConformance) for every built-in method and for
the example external plugin in plugins/peftbench-layernorm."""

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
