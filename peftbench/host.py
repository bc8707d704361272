"""The plugin host: one pluggy manager, five registries filled through the hooks.

Built-in plugins (``peftbench_plugins``) load exactly like third-party ones; third-party plugins come
from the ``peftbench`` entry-point group. ``PEFTBENCH_PLUGINS`` (comma-separated plugin names, or an
empty string for none) restricts which third-party plugins load.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import pluggy

from peftbench import api
from peftbench.api import CommandPlugin, DatasetPlugin, ExporterPlugin, MethodPlugin, Registry, TrainerPlugin
from peftbench.console import console
from peftbench.errors import PeftbenchError, did_you_mean

DEFAULT_PLUGINS = (
    "peftbench_plugins.datasets",
    "peftbench_plugins.methods.lora",
    "peftbench_plugins.methods.qlora",
    "peftbench_plugins.methods.prefix_tuning",
    "peftbench_plugins.methods.ia3",
    "peftbench_plugins.methods.bitfit",
    "peftbench_plugins.trainers.hf",
    "peftbench_plugins.exporters.adapter",
    "peftbench_plugins.exporters.merged",
    "peftbench_plugins.gguf",
)
ENTRY_POINT_GROUP = "peftbench"

class Host:
    """A loaded set of plugins and the registries they filled."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.datasets: Registry[DatasetPlugin] = Registry("dataset", DatasetPlugin)
        self.methods: Registry[MethodPlugin] = Registry("method", MethodPlugin)
        self.trainers: Registry[TrainerPlugin] = Registry("trainer", TrainerPlugin)
        self.exporters: Registry[ExporterPlugin] = Registry("exporter", ExporterPlugin)
        self.commands: Registry[CommandPlugin] = Registry("command", CommandPlugin)
        hooks = {
            "peftbench_register_datasets": self.datasets,
            "peftbench_register_methods": self.methods,
            "peftbench_register_trainers": self.trainers,
            "peftbench_register_exporters": self.exporters,
            "peftbench_register_commands": self.commands,
        }
        # Call each implementation on its own so a duplicate names the plugin that caused it.
        for hook_name, registry in hooks.items():
            hook = getattr(pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):
                registry.current_plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
                impl.function(register=registry)


def _allowed_third_party() -> set[str] | None:
    raw = os.environ.get("PEFTBENCH_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


# Third-party plugins that failed to import in the last load: name -> error (`peftbench plugins` shows them).
broken_plugins: dict[str, str] = {}


def make_plugin_manager(load_entry_points: bool = True, extra_plugins=()) -> pluggy.PluginManager:
    import importlib
    from importlib.metadata import entry_points

    pm = pluggy.PluginManager("peftbench")
    pm.add_hookspecs(api)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    broken_plugins.clear()
    if load_entry_points and os.environ.get("PEFTBENCH_LOAD_ENTRY_POINTS", "1") != "0":
        allowed = _allowed_third_party()
        installed = list(entry_points(group=ENTRY_POINT_GROUP))
        unknown = sorted((allowed or set()) - {ep.name for ep in installed})
        if unknown:
            names = [ep.name for ep in installed]
            raise PeftbenchError(
                f"PEFTBENCH_PLUGINS names {', '.join(repr(n) for n in unknown)}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not installed.{did_you_mean(unknown[0], names)}",
                f"installed third-party plugins: {', '.join(names) or 'none'}; fix the name or unset PEFTBENCH_PLUGINS.")
        for ep in installed:
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.has_plugin(ep.name) or ep.value in DEFAULT_PLUGINS:
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken third-party plugin must not break every command
                broken_plugins[ep.name] = f"{type(e).__name__}: {e}".splitlines()[0]
                console.print(f"[yellow]warning:[/] plugin '{ep.name}' ({ep.value}) failed to load and is skipped: "
                              f"{broken_plugins[ep.name]}. Fix: reinstall or uninstall it, or leave it out with "
                              "PEFTBENCH_PLUGINS=name,...", soft_wrap=True)
                continue
            pm.register(plugin, name=ep.name)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


_extra_plugins: list = []


@lru_cache(maxsize=1)
def get_host() -> Host:
    return Host(make_plugin_manager(extra_plugins=_extra_plugins))


def reset_host() -> None:
    """Forget the cached host so the next ``get_host()`` reloads every plugin."""
    get_host.cache_clear()


@contextmanager
def registered(plugin):
    """Register a plugin object (a module or a class holding hookimpls) for the duration of a block."""
    _extra_plugins.append(plugin)
    reset_host()
    try:
        yield get_host()
    finally:
        _extra_plugins.remove(plugin)
        reset_host()


def load_examples(dataset: str, options: dict, n: int | None = None, split: str = "test") -> list[dict]:
    """``n`` examples of ``split`` (validation if there is none, else train) from the dataset plugin
    named ``dataset`` with ``options`` (its Options fields), normalised as for a run."""
    plugin = get_host().datasets.get(dataset)
    splits = plugin.load(plugin.Options(**options), seed=0).splits
    name = split if split in splits else "validation" if "validation" in splits else "train"
    rows = splits[name]
    if n is not None:
        rows = rows.select(range(min(n, len(rows))))
    return [dict(r) for r in rows]
