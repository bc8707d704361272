"""The plugin kit is documented: every helper ``peftbench.kit`` exports is in docs/plugin-kit.md, and the
page names nothing the kit does not export (datasette's test that every hook is documented, for helpers)."""

from __future__ import annotations

import re
from pathlib import Path

import peftbench.kit

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugin-kit.md"


def documented_names() -> set[str]:
    """Names in the first column of the page's helper tables: `name(...)` or `NAME`."""
    names = set()
    for row in PAGE.read_text(encoding="utf-8").splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            names |= set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", first_cell))
    return names


def test_every_kit_helper_is_documented():
    assert sorted(set(peftbench.kit.__all__) - documented_names()) == []


def test_the_page_documents_nothing_the_kit_lacks():
    modules = {"peftbench"}  # the first table names modules, not helpers
    assert sorted(documented_names() - set(peftbench.kit.__all__) - modules) == []


def test_the_kit_exports_what_it_lists():
    assert all(hasattr(peftbench.kit, name) for name in peftbench.kit.__all__)
