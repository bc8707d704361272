"""Hook specifications. Each hook receives a typed register object; plugins call it."""

import pluggy

hookspec = pluggy.HookspecMarker("peftbench")
hookimpl = pluggy.HookimplMarker("peftbench")


@hookspec
def peftbench_register_datasets(register):
    "Register dataset plugins that load dialogue/summary splits."


@hookspec
def peftbench_register_methods(register):
    "Register parameter-efficient fine-tuning methods."


@hookspec
def peftbench_register_trainers(register):
    "Register trainers that run the optimisation loop."


@hookspec
def peftbench_register_exporters(register):
    "Register exporters that write the trained model in some format."
