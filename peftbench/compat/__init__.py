"""Workarounds for upstream libraries, one module per library.

Each function here exists because a released version of a library does something peftbench must not
inherit; its docstring names the library, the versions and the behaviour. When the project's minimum
version moves past a fixed release, the workaround is deleted here and its callers call the library
directly. Workarounds for libraries that only a plugin uses live in that plugin's own ``compat``
module (llama-cpp-python: ``peftbench_plugins.gguf.compat``).
"""
