"""The plugin's own tests: peftbench's conformance suite (python -m pytest examples/peftbench-layernorm).

`plugins` registers the module for these tests, so they run whether or not the package is installed."""

import peftbench_layernorm

from peftbench.testing import MethodConformance


class TestLnTuning(MethodConformance):
    plugins = (peftbench_layernorm,)
    method = {"name": "ln_tuning"}
