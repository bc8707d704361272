"""Every hook of peftbench.api is documented for plugin authors in docs/plugin-api.md (as datasette checks)."""

from __future__ import annotations

from pathlib import Path

from peftbench import api

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugin-api.md"


def test_every_hook_is_documented():
    hooks = [name for name in dir(api) if name.startswith("peftbench_")]
    text = DOCS.read_text(encoding="utf-8")
    assert hooks and [h for h in hooks if f"`{h}(" not in text] == []


def test_every_hook_has_a_one_line_docstring():
    for name in (n for n in dir(api) if n.startswith("peftbench_")):
        doc = getattr(api, name).__doc__ or ""
        assert doc.strip() and "\n" not in doc.strip(), name
