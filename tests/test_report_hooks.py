"""The report hooks' contract (peftbench/api.py, docs/plugin-api.md): every hook gets the typed run
record, ``api.RunRecord``, with an exporter's own fields open under ``.info``; never run.json as a dict."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import record_fixtures as fixtures  # noqa: E402

from peftbench import api  # noqa: E402


class Spy:
    """A plugin that keeps what each report hook was given."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    @api.hookimpl
    def peftbench_run_report_sections(self, record):
        self.seen.setdefault("run", []).append(record)
        return []

    @api.hookimpl
    def peftbench_comparison_report_sections(self, records):
        self.seen.setdefault("comparison", []).extend(records)
        return []

    @api.hookimpl
    def peftbench_print_run_summary(self, record):
        self.seen.setdefault("summary", []).append(record)


def test_report_hooks_receive_the_typed_record(tmp_path):
    from peftbench.compare.report import write_report
    from peftbench.host import get_host
    from peftbench.pipeline.report import print_plugin_summaries, render_run_report

    spy, pm = Spy(), get_host().pm
    pm.register(spy, name="report-hooks-spy")
    try:
        record = api.RunRecord.from_json(fixtures.single_runs()["run_exported_after_run"])
        render_run_report(record)
        print_plugin_summaries(record)
        write_report([fixtures.write_runs(tmp_path / "runs", fixtures.comparison())], tmp_path / "r.md")
    finally:
        pm.unregister(spy)
    seen = [r for records in spy.seen.values() for r in records]
    assert set(spy.seen) == {"run", "comparison", "summary"} and seen
    assert all(isinstance(r, api.RunRecord) for r in seen)
    assert spy.seen["run"][0].exports["gguf"].info["quant_type"] == "Q4_K_M"  # the exporter's own field, open
    assert spy.seen["run"][0].eval["gguf"].info["agreement_with_hf"]["rouge1"] == 76.5
