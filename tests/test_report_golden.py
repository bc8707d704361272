"""The reports rendered from tests/record_fixtures.py's records, byte for byte against tests/golden/.

A change that means to change a report regenerates the files and shows the difference in its diff:
    PYTHONPATH=. python tests/test_report_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import record_fixtures as fixtures  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def rendered(tmp: Path) -> dict[str, str]:
    """Every golden report's text, by file name, rendered into ``tmp``."""
    from peftbench.compare.report import write_report
    from peftbench.pipeline.record import RunRecord
    from peftbench.pipeline.report import render_run_report

    out = {f"{name}.md": render_run_report(RunRecord.from_json(record)) for name, record in fixtures.single_runs().items()}
    comparison = fixtures.write_runs(tmp / "compare_fixture", fixtures.comparison())
    separate = fixtures.write_runs(tmp / "separate", fixtures.separate_runs())
    reports = {"compare_fixture.md": [comparison], "separate_runs.md": [separate / name for name in sorted(
        p.name for p in separate.iterdir())]}
    for name, paths in reports.items():
        path = write_report(paths, tmp / "reports" / name, command=f"peftbench report ... -o {name}")
        out[name] = path.read_text(encoding="utf-8")
    return out


def test_reports_render_as_the_golden_files(tmp_path):
    for name, text in rendered(tmp_path).items():
        assert text == (GOLDEN / name).read_text(encoding="utf-8"), f"{name} differs from tests/golden/{name}"


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in rendered(Path(tmp)).items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
            print(f"wrote {GOLDEN / name}")
