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


def _with_forgetting(out: dict, base: list[float], tuned: list[float], gguf: float | None = None) -> dict:
    import math
    import statistics

    loss = lambda xs: {"loss": sum(xs) / len(xs), "perplexity": math.exp(sum(xs) / len(xs)), "tokens": 100 * len(xs),
                       "per_text": xs}
    diffs = [b - a for a, b in zip(base, tuned)]
    out["forgetting"] = {"texts": "built-in", "n_texts": len(base), "base": loss(base), "finetuned": loss(tuned),
                         "change": loss(tuned)["loss"] - loss(base)["loss"],
                         "change_se": statistics.stdev(diffs) / math.sqrt(len(diffs))}
    if gguf is not None:
        out["eval"]["gguf"].update(forgetting_loss=gguf, forgetting_perplexity=math.exp(gguf), forgetting_tokens=400,
                                   forgetting_per_text=[gguf] * 4)
    return out


def test_forgetting_figures_appear_in_the_run_report_and_the_comparison(tmp_path):
    """Records with the forgetting probe: the run report's table (and the GGUF's line), the comparison's
    column with the mean over seeds; records without it keep their reports (the golden files)."""
    from peftbench.compare.report import write_report
    from peftbench.pipeline.record import RunRecord
    from peftbench.pipeline.report import render_run_report

    gguf_run = _with_forgetting(fixtures.single_runs()["run_gguf_in_run"], [2.0, 2.1, 2.2, 2.3], [2.1, 2.1, 2.4, 2.3], 2.2)
    report = render_run_report(RunRecord.from_json(gguf_run))
    assert "Forgetting: language-modelling loss (nats per token) on 4 general texts (built-in)" in report
    assert "| base model | 2.1500 | 8.58 | 400 |" in report and "| fine-tuned | 2.2250 | 9.25 | 400 |" in report
    assert "| change | +0.0750 ± 0.0479 |  |  |" in report
    assert "GGUF Q4_K_M general-text loss (llama.cpp, same texts): 2.2000, perplexity 9.03; fine-tuned HF model 2.2250 (-0.0250)." in report

    runs = fixtures.comparison()
    forgetting_runs = [r for r in runs if r["eval"].get("finetuned")
                       and (r["run_info"].get("comparison") or {}).get("phase", "final") == "final"][:2]
    for i, run in enumerate(forgetting_runs):
        _with_forgetting(run, [2.0, 2.0], [2.1 + i, 2.3 + i])
    path = write_report([fixtures.write_runs(tmp_path / "runs", runs)], tmp_path / "report.md")
    text = path.read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert header.endswith("| general-text loss change |") and "mean over seeds" in text
    assert "| +0.7000 ± 0.7071 |" in text  # seeds changed by +0.2 and +1.2


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in rendered(Path(tmp)).items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
            print(f"wrote {GOLDEN / name}")
