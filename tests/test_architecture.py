"""The layout's rules, checked from the source: no import cycle, core never imports a plugin, and
plugins import only the supported surface of peftbench (``peftbench.api`` and ``peftbench.kit``).

Every import statement counts, also those inside functions (a lazy import still ties two modules
together) and those under ``if TYPE_CHECKING:`` (a cycle of types is a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peftbench", "peftbench_plugins")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its source."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules that
    import each other in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_packages():
    graph = import_graph()
    assert {"peftbench.cli", "peftbench.api", "peftbench.host", "peftbench_plugins.methods.lora"} <= set(graph)
    assert "peftbench.api" in graph["peftbench_plugins.methods.lora"]


def test_cycle_detection_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_core_never_imports_a_plugin_module():
    """peftbench loads its built-in plugins by module name (host.DEFAULT_PLUGINS), like third-party
    ones from entry points, and never imports them: built-ins are written like third-party plugins."""
    graph = import_graph()
    offending = {name: sorted(t for t in targets if t.startswith("peftbench_plugins"))
                 for name, targets in graph.items() if name.startswith("peftbench.")}
    assert {name: targets for name, targets in offending.items() if targets} == {}


SUPPORTED_SURFACE = {"peftbench.api", "peftbench.kit"}


def plugin_package(module: str) -> str:
    """The plugin a built-in plugin module belongs to: ``peftbench_plugins.<first name>``."""
    return ".".join(module.split(".")[:2])


def test_plugins_import_only_the_supported_surface():
    """A built-in plugin uses what a third-party plugin may use: peftbench.api and peftbench.kit, and
    modules of its own plugin package. Anything else of peftbench is internal."""
    graph = import_graph()
    offending = {}
    for name, targets in graph.items():
        if not name.startswith("peftbench_plugins."):
            continue
        outside = sorted(t for t in targets if (t.startswith("peftbench.") and t not in SUPPORTED_SURFACE)
                         or (t.startswith("peftbench_plugins") and plugin_package(t) != plugin_package(name)))
        if outside:
            offending[name] = outside
    assert offending == {}


def test_the_surface_check_sees_an_internal_import(tmp_path):
    module = tmp_path / "plugin.py"
    module.write_text("from peftbench.kit import console\nfrom peftbench.pipeline import runner\n")
    known = {"peftbench.kit": ROOT, "peftbench.pipeline.runner": ROOT, "peftbench.pipeline": ROOT}
    found = imported_modules("peftbench_plugins.x", module, known)
    assert found - SUPPORTED_SURFACE == {"peftbench.pipeline.runner"}


PACKAGES = ("peftbench", "peftbench_plugins")
MAX_FUNCTION_LINES = 50


def test_no_function_in_the_package_is_over_50_lines():
    """Core and plugins read as short stages: a function past 50 lines is several stages in one."""
    long = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_core_names_no_exporter_of_a_plugin():
    """The run pipeline and comparisons know exporters only through the registry and the hooks: no string in
    them names the GGUF plugin's exporters or score keys (environment.py lists the gguf *package*'s version)."""
    plugin_names = {"gguf", "gguf_unquantized", "ollama"}
    named = []
    for folder in ("peftbench/pipeline", "peftbench/compare"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "environment.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in plugin_names:
                    named.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert named == []
