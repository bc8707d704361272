"""Comparisons: recipe expansion and validation, the report over run records, and a real two-method run."""

import copy
import struct

import pytest
import yaml

from peftbench.cli import main
from peftbench.compare.report import Run, load_runs, pareto_front, render_markdown, write_report
from peftbench.compare.plan import load_comparison
from peftbench.api import Capabilities, ExporterPlugin, ExportResult, MethodPlugin
from peftbench.errors import PeftbenchError
from peftbench.api import hookimpl
from peftbench.host import registered
from peftbench.files import atomic_write_json, read_json
from peftbench.pipeline.record import RunRecord, Scores
from peftbench.testing import tiny_recipe

# --- expansion and validation --------------------------------------------------------------------


@pytest.fixture
def base_file(tmp_path, tiny_model_dir, tiny_data_dir):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "lora", "r": 4, "alpha": 8})))
    return path


def write_comparison(tmp_path, **spec):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_methods_seeds_and_grids_expand_into_named_runs(tmp_path, base_file):
    path = write_comparison(
        tmp_path, base=str(base_file), seeds=[1, 2], grid={"trainer.learning_rate": [1e-4, 1e-3]},
        methods=["lora", {"method": {"name": "qlora", "r": 2}, "grid": {"method.r": [2, 8]}}],
        output_dir=str(tmp_path / "out"),
    )
    comparison = load_comparison(path, overrides=["evaluation.max_new_tokens=5"])
    names = [r.name for r in comparison.runs]
    assert names == [f"lora-learning_rate{lr}-seed{s}" for lr in ("0.0001", "0.001") for s in (1, 2)] + [
        f"qlora-learning_rate{lr}-r{r}-seed{s}" for lr in ("0.0001", "0.001") for r in (2, 8) for s in (1, 2)]
    by_name = {r.name: r for r in comparison.runs}
    lora = by_name["lora-learning_rate0.001-seed2"]
    assert lora.seed == 2 and lora.raw["seed"] == 2 and lora.grid == {"trainer.learning_rate": 0.001}
    assert lora.raw["method"] == {"name": "lora", "r": 4, "alpha": 8}, "same method as the base: options merged"
    assert lora.raw["trainer"]["learning_rate"] == 0.001
    qlora = by_name["qlora-learning_rate0.0001-r8-seed1"]
    assert qlora.raw["method"] == {"name": "qlora", "r": 8}, "another method replaces the base's options"
    assert qlora.config == "qlora-learning_rate0.0001-r8" and qlora.label == "qlora"
    # Data, prompt, evaluation and budget are the base's in every run; the command line applies to all.
    for run in comparison.runs:
        assert run.raw["dataset"] == lora.raw["dataset"] and run.raw["prompt"] == lora.raw["prompt"]
        assert run.raw["evaluation"]["max_new_tokens"] == 5
        assert run.raw["trainer"]["max_steps"] == 4
    assert comparison.output_dir == tmp_path / "out"
    assert comparison.report_path == tmp_path / "out" / "comparison.md"


def test_an_entry_takes_method_and_optimiser_settings_from_a_method_recipe(tmp_path, base_file, tiny_model_dir, tiny_data_dir):
    method_recipe = tmp_path / "ia3_like.yaml"
    other = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "qlora", "r": 16})
    other["trainer"].update(learning_rate=0.05, warmup_steps=3, max_steps=99, batch_size=1)
    method_recipe.write_text(yaml.safe_dump(other))
    path = write_comparison(tmp_path, base=str(base_file), methods=[{"recipe": str(method_recipe), "trainer": {"warmup_steps": 1}}])
    (run,) = load_comparison(path).runs
    assert run.raw["method"] == {"name": "qlora", "r": 16}
    assert run.raw["trainer"]["learning_rate"] == 0.05 and run.raw["trainer"]["warmup_steps"] == 1, "the entry wins"
    assert (run.raw["trainer"]["max_steps"], run.raw["trainer"]["batch_size"]) == (4, 4), "the base keeps the budget"
    assert any("batch_size, max_steps" in note for note in run.notes)


class NeedsMerge(ExporterPlugin):
    name = "needs_merge"
    requires = ("mergeable",)

    def export(self, options, ctx):
        return ExportResult(files={})


class Unmergeable(MethodPlugin):
    name = "unmergeable"
    capabilities = Capabilities(mergeable=False)


class CapabilityPlugin:
    @hookimpl
    def peftbench_register_exporters(self, register):
        register(NeedsMerge)

    @hookimpl
    def peftbench_register_methods(self, register):
        register(Unmergeable)


def test_exporter_a_method_cannot_take_is_left_out_with_a_note(tmp_path, tiny_model_dir, tiny_data_dir):
    base = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "lora"}, exporters=[{"name": "adapter"}, {"name": "needs_merge"}])
    path = write_comparison(tmp_path, base=base, methods=["lora", "unmergeable"])
    with registered(CapabilityPlugin()):
        lora, unmergeable = load_comparison(path).runs
    assert [e["name"] for e in lora.raw["exporters"]] == ["adapter", "needs_merge"] and not lora.notes
    assert [e["name"] for e in unmergeable.raw["exporters"]] == ["adapter"]
    assert unmergeable.notes == ["exporter 'needs_merge' left out: method 'unmergeable' lacks mergeable"]
    assert unmergeable.annotation()["notes"] == unmergeable.notes


def test_every_problem_of_every_run_is_reported_before_anything_runs(tmp_path, base_file, capsys):
    path = write_comparison(
        tmp_path, base=str(base_file), output_dir=str(tmp_path / "out"),
        methods=["lora", {"method": "qlora", "trainer": {"max_steps": 9}}, {"method": "lora", "trainer": {"learning_rat": 1}},
                 {"method": "nosuchmethod"}],
    )
    assert main(["run", str(path)]) == 2
    out = capsys.readouterr().out
    assert out.count("error:") == 1, "one message"
    assert "two entries are named 'lora'" in out
    assert "trainer.learning_rat: unknown key. Did you mean 'learning_rate'?" in out
    assert "unknown method 'nosuchmethod'" in out
    assert "runs differ in training budget: max_steps=4 (lora) vs max_steps=9 (qlora)" in " ".join(out.split())
    assert not (tmp_path / "out").exists()


def test_comparison_file_errors_are_named(tmp_path):
    path = write_comparison(tmp_path, base="recipes/quickstart.yaml", methods=[], grid={"r": [1]}, seed=[1])
    with pytest.raises(PeftbenchError) as e:
        load_comparison(path)
    assert "methods: List should have at least 1 item" in e.value.problem
    assert "seed: unknown key. Did you mean 'seeds'?" in e.value.problem
    assert "grid key 'r' must be a section path" in e.value.problem


def test_shipped_comparisons_validate(tiny_model_dir):
    assert [r.name for r in load_comparison("recipes/compare_quickstart.yaml").runs] == [
        "qlora", "lora", "prefix_tuning", "ia3", "bitfit"]
    local = str(tiny_model_dir)  # a local model path is accepted (and checked to be a model)
    samsum = load_comparison("recipes/compare_samsum.yaml", [f"model.name={local}"])
    assert {r.raw["method"]["name"] for r in samsum.runs} == {"qlora", "lora", "prefix_tuning", "ia3", "bitfit"}
    assert {r.raw["model"]["name"] for r in samsum.runs} == {local}


# --- the report, on records written here ---------------------------------------------------------


def fake_record(name, method, *, rouge1, seed=0, failed=False, gguf=None, trainable=1000, grid=None, config=None,
                notes=(), memory=2 * 2**30, losses=(2.0, 1.5, 1.2)):
    recipe = {"seed": seed, "model": {"name": "tiny"}, "method": {"name": method, "r": 8},
              "trainer": {"name": "hf", "epochs": 1, "max_steps": 10, "batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3},
              "dataset": {"name": "chatsum"}}
    record = RunRecord.new(recipe, experiment_name=name).as_json()
    record["run_info"]["created_at"] = f"2026-01-0{seed + 1}T00:00:00+00:00"  # differs per run; never in the report
    record["meta_info"] = {
        "model_id": "tiny", "dataset_info": {"name": "chatsum", "eval_split": "test", "eval_rows": 60},
        "package_info": {"torch-version": "2.13.0", "peft-version": "0.21.2"},
        "system_info": {"device": "cpu", "compute_dtype": "float32", "cpu_count": 2, "cpu": "AMD EPYC, 2 cores (avx2)",
                        "system": "Linux", "machine": "x86_64",
                        "python": "3.12.0", "accelerator": None},
    }
    record["eval"]["baseline"] = {"rouge1": 20.0, "rouge2": 5.0, "rougeL": 15.0, "rougeLsum": 16.0, "n": 60, "eval_time_s": 30.0}
    if config:
        record["run_info"]["comparison"] = {"config": config, "label": method, "seed": seed, "grid": grid or {}, "notes": list(notes)}
    if failed:
        record["run_info"].update(status="failed", error_msg="RuntimeError: out of memory")
        return record
    record["run_info"]["status"] = "success"
    record["train_info"].update(
        status="success", num_trainable_params=trainable, num_total_params=100_000, trainable_percent=100 * trainable / 100_000,
        file_size=trainable * 4 + 1000, train_time=100.0 + trainable / 100, steps=10, tokens_seen=50_000,
        tokens_per_second=round(50_000 / (100.0 + trainable / 100), 1), final_loss=losses[-1], accelerator_memory_max=memory,
        metrics=[{"loss": loss, "step": 5 * (i + 1), "epoch": 0.5 * (i + 1)} for i, loss in enumerate(losses)],
    )
    record["eval"]["finetuned"] = {"rouge1": rouge1, "rouge2": rouge1 / 4, "rougeL": rouge1 * 0.8, "rougeLsum": rouge1 * 0.9,
                                   "n": 60, "eval_time_s": 40.0}
    if gguf is not None:
        record["eval"]["gguf"] = {"rouge1": gguf, "rouge2": gguf / 4, "rougeL": gguf * 0.8, "rougeLsum": gguf * 0.9, "n": 60,
                                  "quant_type": "Q4_K_M", "hf_rouge1_same_examples": rouge1,
                                  "agreement_with_hf": {"rouge1": 80.0}, "passed": True,
                                  "generation": {"tokens_per_second": 40.0}}
        record["exports"]["gguf"] = {"files": {"gguf": "model-Q4_K_M.gguf"}, "sizes": {"gguf": 100 * 2**20},
                                     "quant_type": "Q4_K_M"}
    return record


def write_runs(root, records):
    for record in records:
        atomic_write_json(root / record["run_info"]["experiment_name"] / "run.json", record)
    return root


def three_methods():
    return [
        fake_record("lora", "lora", rouge1=31.2, trainable=2000, gguf=30.5),
        fake_record("ia3", "ia3", rouge1=25.0, trainable=100, memory=1 * 2**30),
        fake_record("prefix_tuning", "prefix_tuning", rouge1=0.0, failed=True),
    ]


def table_rows(markdown):
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_table_values_best_marks_and_failed_rows(tmp_path):
    runs = load_runs([write_runs(tmp_path / "runs", three_methods())])
    markdown = render_markdown(runs, title="t", command="peftbench report runs -o r.md")
    rows = table_rows(markdown)
    assert list(rows) == ["base model (no training)", "ia3", "lora", "prefix_tuning — **failed**"]
    lora, ia3 = rows["lora"], rows["ia3"]
    assert lora["ROUGE-1 (Δ base)"] == "**31.20 (+11.20)**", "highest ROUGE-1 in bold, change against the base"
    assert ia3["ROUGE-1 (Δ base)"] == "25.00 (+5.00)"
    assert rows["base model (no training)"]["ROUGE-1 (Δ base)"] == "20.00"
    assert ia3["trainable params"] == "**100 (0.100%)**" and lora["trainable params"] == "2,000 (2.000%)"
    assert ia3["peak memory"] == "**1.0 GiB**" and lora["peak memory"] == "2.0 GiB"
    assert not any("GGUF" in column for column in lora), "one seed's GGUF is not set beside the seeds' HF means"
    gguf = markdown.split("## GGUF exports")[1].split("## ")[0]
    assert "| lora | in the run | — | 60 | Q4_K_M | 100.0 MiB | 30.50 | 31.20 | -0.70 | 80.00 | 40.0 | passed |" in gguf, \
        "the GGUF against the same run's HF model on the same examples"
    assert "| ia3 |" not in gguf, "a run without a GGUF has no row"
    assert ia3["train time"] == "**101.0 s**" and lora["non-pad tokens/s"] == "417"
    assert set(rows["prefix_tuning — **failed**"].values()) == {"prefix_tuning — **failed**", "—"}
    assert "prefix_tuning failed: RuntimeError: out of memory" in markdown
    assert "peftbench report runs -o r.md" in markdown.split("## ")[0], "the regenerating command comes first"
    assert "cpu (float32, AMD EPYC, 2 cores (avx2), Linux x86_64), Python 3.12.0; torch 2.13.0, peft 0.21.2" in markdown


def test_same_records_give_identical_markdown_in_any_order(tmp_path):
    records = three_methods()
    a = write_runs(tmp_path / "a", records)
    b = write_runs(tmp_path / "b", copy.deepcopy(records))
    first = render_markdown(load_runs([a]), title="t")
    assert render_markdown(load_runs([a]), title="t") == first
    assert render_markdown(list(reversed(load_runs([b]))), title="t") == first, "paths and input order do not matter"
    one, two = write_report([a], tmp_path / "one" / "r.md"), write_report([b], tmp_path / "two" / "r.md")
    assert one.read_bytes() == two.read_bytes()


def test_seeds_give_mean_and_spread_and_grids_are_ranked(tmp_path):
    records = [fake_record(f"lora-lr{lr}-seed{s}", "lora", rouge1=r, seed=s, config=f"lora-lr{lr}", grid={"trainer.learning_rate": lr})
               for lr, scores in ((0.001, (30.0, 32.0)), (0.01, (20.0, 22.0))) for s, r in zip((1, 2), scores)]
    records.append(fake_record("lora-lr0.1-seed1", "lora", rouge1=0, seed=1, config="lora-lr0.1", failed=True,
                               grid={"trainer.learning_rate": 0.1}))
    markdown = render_markdown([Run(RunRecord.from_json(r)) for r in records], title="t")
    rows = table_rows(markdown)
    assert rows["lora lr=1e-3 (2 seeds)"]["ROUGE-1 (Δ base)"] == "**31.00 ± 1.41 (+11.00)**", "configurations named readably"
    assert rows["lora lr=1e-2 (2 seeds)"]["ROUGE-1 (Δ base)"] == "21.00 ± 1.41 (+1.00)"
    assert "lora lr=0.1 — **failed**" in rows
    ranking = markdown.split("## Ranking by ROUGE-1")[1].split("##")[0]
    assert ranking.index("lora lr=1e-3") < ranking.index("lora lr=1e-2")
    assert "| 1 | lora lr=1e-3 | trainer.learning_rate=0.001 | 31.00 ± 1.41 | +11.00 |" in ranking
    assert "seeds: 1, 2." in markdown


def test_plots_are_png_files_beside_the_report(tmp_path):
    out = write_report([write_runs(tmp_path / "runs", three_methods())], tmp_path / "reports" / "cmp.md")
    markdown = out.read_text()
    names = ["cmp_rouge1_vs_params.png", "cmp_rouge1_vs_train_time.png", "cmp_rouge1_vs_memory.png", "cmp_loss.png"]
    import matplotlib.image

    for name in names:
        data = (out.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200
        assert matplotlib.image.imread(out.parent / name).shape[:2] == (height, width)
        assert f"({name})" in markdown


def test_pareto_front_keeps_points_nothing_beats():
    points = [(1, 10), (2, 30), (3, 20), (4, 40), (4, 35), (0.5, 5)]
    assert pareto_front(points) == [(0.5, 5), (1, 10), (2, 30), (4, 40)]


def test_report_cli_accepts_run_dirs_and_parents(tmp_path, capsys):
    root = write_runs(tmp_path / "runs", three_methods())
    out = tmp_path / "r.md"
    assert main(["report", str(root / "lora"), str(root), "-o", str(out)]) == 0
    assert len([line for line in out.read_text().splitlines() if line.startswith("| ") and "—" in line]) >= 1
    assert set(table_rows(out.read_text())) == {"base model (no training)", "ia3", "lora", "prefix_tuning — **failed**"}
    assert main(["report", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    assert "is not a run directory" in capsys.readouterr().out


# --- end to end ------------------------------------------------------------------------------------


def test_two_methods_compared_end_to_end(tmp_path, base_file):
    """lora and qlora on the tiny model, each in its own process, plus a run that fails at training
    time: the comparison goes on, records it, and the report shows all three."""
    path = write_comparison(
        tmp_path, base=str(base_file), output_dir=str(tmp_path / "runs"), report=str(tmp_path / "reports" / "cmp.md"),
        methods=["lora", {"method": {"name": "qlora", "r": 4}},
                 {"label": "broken", "method": {"name": "lora", "target_modules": ["no_such_proj"]}}],
    )
    assert main(["run", str(path), "trainer.max_steps=2", "evaluation.max_samples=2"]) == 1, "a run failed"
    records = {d.name: read_json(d / "run.json") for d in (tmp_path / "runs").iterdir() if (d / "run.json").is_file()}
    assert set(records) == {"lora", "qlora", "broken"}
    for name in ("lora", "qlora"):
        record = records[name]
        assert record["run_info"]["status"] == "success"
        assert record["run_info"]["comparison"]["config"] == name
        assert record["train_info"]["steps"] == 2 and record["eval"]["finetuned"]["n"] == 2
    assert records["broken"]["run_info"]["status"] == "failed" and "no_such_proj" in records["broken"]["run_info"]["error_msg"]

    # What peft's method_comparison/processing.py reads from each record is there, with its types.
    record = records["qlora"]
    info, train, meta = record["run_info"], record["train_info"], record["meta_info"]
    assert info["peft_config"]["peft_type"] == "LORA" and isinstance(info["peft_config"]["target_modules"], list)
    assert info["train_config"]["model_id"] == record["run_info"]["recipe"]["model"]["name"] and "peft_branch" in info
    assert train["status"] == "success" and isinstance(train["file_size"], int) and isinstance(train["train_time"], float)
    for key in ("accelerator_memory_max", "accelerator_memory_reserved_avg", "accelerator_memory_reserved_99th"):
        assert isinstance(train[key], int) and train[key] > 0
    last = train["metrics"][-1]
    assert last["test accuracy"] == pytest.approx(record["eval"]["finetuned"]["rouge1"] / 100)
    assert last["train total tokens"] == train["tokens_seen"] and last["train samples"] == 8  # 2 steps x batch 4
    assert isinstance(last["train loss"], float)
    for package in ("peft", "transformers", "datasets", "torch", "bitsandbytes"):
        assert meta["package_info"][f"{package}-version"]

    rows = table_rows((tmp_path / "reports" / "cmp.md").read_text())
    assert set(rows) == {"base model (no training)", "broken — **failed**", "lora", "qlora"}
    assert (tmp_path / "reports" / "cmp_loss.png").is_file()
    head = (tmp_path / "reports" / "cmp.md").read_text().split("## ")[0]
    assert f"peftbench run {path} trainer.max_steps=2 evaluation.max_samples=2" in head, "the command that regenerates it"

    # Run again: finished runs are refused unless resumed, and resuming keeps them.
    assert main(["run", str(path), "trainer.max_steps=2", "evaluation.max_samples=2"]) == 2
    before = (tmp_path / "runs" / "lora" / "run.json").read_text()
    lora_only = write_comparison(tmp_path, base=str(base_file), output_dir=str(tmp_path / "runs"),
                                 report=str(tmp_path / "reports" / "cmp.md"), methods=["lora"])
    assert main(["run", str(lora_only), "trainer.max_steps=2", "evaluation.max_samples=2", "--resume"]) == 0
    assert (tmp_path / "runs" / "lora" / "run.json").read_text() == before


# --- trackers --------------------------------------------------------------------------------------


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))


@pytest.mark.skipif(_tensorboard_installed(), reason="tensorboard is installed here")
def test_a_tracker_that_is_not_installed_is_named_before_running(write_recipe, capsys):
    assert main(["validate", str(write_recipe()), "trainer.report_to=[tensorboard]"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "trainer.report_to: Value error, tensorboard not installed (pip install tensorboard" in out


@pytest.mark.skipif(not _tensorboard_installed(), reason="tensorboard is not installed")
def test_training_logs_to_tensorboard_when_asked(tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    assert main(["run", str(write_recipe()), "--output-dir", str(run_dir), "trainer.max_steps=2",
                 "trainer.report_to=[tensorboard]", "evaluation.max_samples=1"]) == 0
    events = list((run_dir / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]


def test_failed_export_and_resumed_run_are_named_in_the_notes(tmp_path):
    """A run whose GGUF check failed keeps its scores but says so; a resumed run's speed is unknown."""
    exported = fake_record("lora", "lora", rouge1=31.2, gguf=28.0)
    exported["run_info"]["stages"] = {"train": {"status": "success"},
                                      "export:gguf": {"status": "failed", "error": "gguf: ROUGE-1 28.00 is 3.20 points below"}}
    resumed = fake_record("ia3", "ia3", rouge1=25.0)
    resumed["train_info"].update(resumed_from_step=900, train_time=None, tokens_per_second=None, accelerator_memory_max=None)
    markdown = render_markdown(load_runs([write_runs(tmp_path / "runs", [exported, resumed])]), title="t", command="c")
    assert "lora: stage export:gguf failed: gguf: ROUGE-1 28.00 is 3.20 points below" in markdown
    assert "ia3 was resumed from step 900: its train time, tokens/s and peak memory are unknown" in markdown
    rows = table_rows(markdown)
    assert rows["lora"]["ROUGE-1 (Δ base)"].startswith("**31.20") and rows["ia3"]["train time"] == "—"


def test_report_refuses_bad_inputs_and_outputs_in_one_line(tmp_path, capsys):
    """Issue 17, case 11: a run.json of the wrong shape and -o at a folder were tracebacks; -o at an
    existing run.json overwrote it."""
    import json

    from peftbench.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("[]")
    good = tmp_path / "good"
    good.mkdir()
    (good / "run.json").write_text(json.dumps(fake_record("lora", "lora", rouge1=40.0)))
    before = (good / "run.json").read_text()
    cases = [
        (["report", str(bad), "-o", str(tmp_path / "r.md")], "is not a peftbench run record"),
        (["report", str(good), "-o", str(tmp_path)], "is a folder"),
        (["report", str(good), "-o", str(good / "run.json")], "is not a Markdown file (.md)"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        out = " ".join(capsys.readouterr().out.split())
        assert expected in out and "Traceback" not in out, out
    assert (good / "run.json").read_text() == before and not (tmp_path / "r.md").exists()


# --- search, then seeds ----------------------------------------------------------------------------


def test_a_search_is_planned_on_a_split_carved_from_train(tmp_path, base_file):
    path = write_comparison(tmp_path, base=str(base_file), seeds=[1, 2], search={"selection_size": 4},
                            methods=[{"method": "lora", "grid": {"trainer.learning_rate": [1e-4, 1e-3]}}, "bitfit"],
                            grid={"trainer.warmup_steps": [0]})
    comparison = load_comparison(path, overrides=["evaluation.split=validation"])
    assert [r.name for r in comparison.runs] == ["search/lora-warmup_steps0-learning_rate0.0001",
                                                 "search/lora-warmup_steps0-learning_rate0.001", "search/bitfit-warmup_steps0"]
    for run in comparison.runs:
        assert run.phase == "search" and run.seed == 1, "one run per grid point, with the first seed"
        assert run.raw["evaluation"]["split"] == "selection" and run.raw["evaluation"]["selection_size"] == 4
        assert run.raw["evaluation"]["baseline"] is False
    finals = comparison.candidates["lora-warmup_steps0-learning_rate0.001"]
    assert [(r.name, r.raw["evaluation"]["split"]) for r in finals] == [
        ("lora-warmup_steps0-learning_rate0.001-seed1", "validation"), ("lora-warmup_steps0-learning_rate0.001-seed2", "validation")]


def test_a_short_horizon_search_has_a_budget_of_its_own(tmp_path, base_file):
    methods = [{"method": "lora", "grid": {"trainer.learning_rate": [1e-4, 1e-3]}}, {"method": "bitfit", "grid": {"trainer.learning_rate": [1e-3]}}]
    path = write_comparison(tmp_path, base=str(base_file), seeds=[1, 2], search={"max_steps": 3}, methods=methods)
    comparison = load_comparison(path, overrides=["evaluation.split=validation", "trainer.max_steps=8"])
    assert {r.raw["trainer"]["max_steps"] for r in comparison.runs} == {3}, "every method searched with the same short budget"
    assert {r.raw["trainer"]["max_steps"] for runs in comparison.candidates.values() for r in runs} == {8}
    quick = load_comparison(path, overrides=["evaluation.split=validation", "trainer.max_steps=2"])
    assert {r.raw["trainer"]["max_steps"] for r in quick.runs} == {2}, "a search never trains longer than the runs it chooses for"


def test_a_problem_of_the_base_recipe_names_every_run_once(tmp_path, base_file, capsys):
    path = write_comparison(tmp_path, base=str(base_file), methods=["lora", "bitfit", "ia3"], seeds=[1, 2])
    assert main(["validate", str(path), "trainer.learning_rate=-1"]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "[every run]" in text and "bitfit-seed2" not in text, text


def test_a_search_on_the_reported_split_is_refused(tmp_path, base_file, capsys):
    path = write_comparison(tmp_path, base=str(base_file), search={"split": "validation"},
                            methods=[{"method": "lora", "grid": {"trainer.learning_rate": [1e-4, 1e-3]}}])
    assert main(["validate", str(path), "evaluation.split=validation"]) == 2
    out = capsys.readouterr()
    assert "search.split 'validation' is the split this comparison reports" in out.out + out.err
    assert "Traceback" not in out.out + out.err
    no_grid = write_comparison(tmp_path, base=str(base_file), search={}, methods=["lora"])
    with pytest.raises(PeftbenchError, match="no grid to search"):
        load_comparison(no_grid)


def test_a_run_stopped_part_way_joins_its_configuration_and_is_not_called_failed(tmp_path):
    """A comparison annotates a run when it ends: one stopped part-way (its machine given back) has a
    record in state "running" and no annotation. It is counted with its configuration, as unfinished."""
    records = [fake_record(f"lora-lr0.001-seed{s}", "lora", rouge1=30.0 + s, seed=s, config="lora-lr0.001",
                           grid={"trainer.learning_rate": 0.001}) for s in (1, 2)]
    stopped = fake_record("lora-lr0.001-seed3", "lora", rouge1=0, seed=3)
    stopped["run_info"]["status"] = "running"
    del stopped["eval"]["finetuned"]
    never = fake_record("ia3-lr0.01-seed1", "ia3", rouge1=0, seed=1)
    never["run_info"]["status"] = "running"
    del never["eval"]["finetuned"]
    markdown = render_markdown([Run(RunRecord.from_json(r)) for r in records + [stopped, never]], title="t")
    rows = table_rows(markdown)
    assert "lora lr=1e-3 (2 seeds, 1 did not finish)" in rows
    assert rows["lora lr=1e-3 (2 seeds, 1 did not finish)"]["ROUGE-1 (Δ base)"] == "31.50 ± 0.71 (+11.50)"
    assert "ia3-lr0.01 — did not finish" in rows and not any("failed" in row for row in rows)
    assert "lora-lr0.001-seed3 did not finish (running)" in markdown


def test_a_setting_chosen_at_the_end_of_its_grid_is_pointed_out(tmp_path):
    def search_run(lr, score, modules):
        config = f"lora-lr{lr}-{modules}"
        record = fake_record(f"search/{config}", "lora", rouge1=score, config=config,
                             grid={"trainer.learning_rate": lr, "method.target_modules": [modules]})
        record["run_info"]["comparison"].update(phase="search", chosen_by=None)
        return record
    runs = [search_run(lr, score, m) for lr, score in ((1e-4, 30.0), (1e-3, 33.0), (1e-2, 35.0)) for m in ("q_proj", "v_proj")]
    final = fake_record("lora-lr0.01-q_proj-seed1", "lora", rouge1=36.0, seed=1, config="lora-lr0.01-q_proj",
                        grid={"trainer.learning_rate": 0.01, "method.target_modules": ["q_proj"]})
    final["run_info"]["comparison"].update(phase="final", chosen_by={"split": "selection", "metric": "rouge1", "value": 35.0})
    markdown = render_markdown([Run(RunRecord.from_json(r)) for r in runs + [final]], title="t")
    assert "- lora: the chosen trainer.learning_rate=0.01 is the largest searched; the best may lie beyond the grid." in markdown
    assert "target_modules=['q_proj'] is the" not in markdown, "a list has no end"
    inside = [search_run(lr, score, "q_proj") for lr, score in ((1e-4, 30.0), (1e-3, 36.0), (1e-2, 35.0))]
    final["run_info"]["comparison"]["grid"]["trainer.learning_rate"] = 0.001
    final["run_info"]["comparison"]["config"] = "lora-lr0.001-q_proj"
    assert "beyond the grid" not in render_markdown([Run(RunRecord.from_json(r)) for r in inside + [final]], title="t")


def _searched(comparison, scores: dict[str, float]) -> dict:
    """Records of finished search runs with the given ROUGE-1 (by configuration), as the runs would write them."""
    records = {}
    for run in comparison.runs:
        if run.config in scores:
            record = RunRecord.new(run.raw, experiment_name=run.name)
            record.eval["finetuned"] = Scores(rouge1=scores[run.config], rouge2=0.0, rougeL=0.0, rougeLsum=0.0, n=4)
            record.run_info.status = "success"
            records[run.name] = record
    return records


def test_a_best_point_on_the_grid_edge_is_searched_past_it_a_bounded_number_of_times(tmp_path, base_file):
    from peftbench.compare.plan import choose, extend_search

    path = write_comparison(tmp_path, base=str(base_file), seeds=[1, 2], search={"extend": 2},
                            methods=[{"method": "lora", "grid": {"trainer.learning_rate": [1e-4, 1e-3, 1e-2]}},
                                     {"method": "bitfit", "grid": {"trainer.learning_rate": [1e-4, 1e-3, 1e-2]}}])
    comparison = load_comparison(path, overrides=["evaluation.split=validation"])
    # lora is best at the largest rate, bitfit inside its grid: only lora's grid grows, by the grid's ratio.
    scores = {"lora-learning_rate0.0001": 20.0, "lora-learning_rate0.001": 25.0, "lora-learning_rate0.01": 30.0,
              "bitfit-learning_rate0.0001": 20.0, "bitfit-learning_rate0.001": 28.0, "bitfit-learning_rate0.01": 21.0}
    more, notes = extend_search(comparison, _searched(comparison, scores))
    assert notes == [] and [(r.name, r.extension, r.phase) for r in more] == [("search/lora-learning_rate0.1", 1, "search")]
    assert more[0].raw["trainer"]["learning_rate"] == 0.1 and more[0].raw["evaluation"]["split"] == "selection"
    finals = comparison.candidates["lora-learning_rate0.1"]
    assert [(r.name, r.raw["trainer"]["learning_rate"], r.raw["evaluation"]["split"]) for r in finals] == [
        ("lora-learning_rate0.1-seed1", 0.1, "validation"), ("lora-learning_rate0.1-seed2", 0.1, "validation")]
    # Still better past the edge: one more step; then the bound (extend: 2) stops it although it is still on the edge.
    more, _ = extend_search(comparison, _searched(comparison, {**scores, "lora-learning_rate0.1": 31.0}))
    assert [r.name for r in more] == ["search/lora-learning_rate1.0"] and more[0].extension == 2
    records = _searched(comparison, {**scores, "lora-learning_rate0.1": 31.0, "lora-learning_rate1.0": 32.0})
    assert extend_search(comparison, records) == ([], [])
    chosen, lines = choose(comparison, records)
    assert {r.name for r in chosen} == {"lora-learning_rate1.0-seed1", "lora-learning_rate1.0-seed2",
                                        "bitfit-learning_rate0.001-seed1", "bitfit-learning_rate0.001-seed2"}
    assert lines[0] == ("lora: trainer.learning_rate=1.0 (rouge1 32.00 on selection, best of 5); past the grid's edge: "
                        "learning_rate=0.1 (31.00) -> learning_rate=1.0 (32.00)")
    assert chosen[0].chosen_by["search_run"] == "search/lora-learning_rate1.0"
    assert next(r for r in comparison.runs if r.extension == 2).annotation()["extension"] == 2


def test_a_search_past_the_edge_stops_when_the_edge_stops_winning_and_skips_invalid_points(tmp_path, base_file):
    from peftbench.compare.plan import extend_search

    path = write_comparison(tmp_path, base=str(base_file), search={"extend": 3},
                            methods=[{"method": "lora", "grid": {"method.dropout": [0.2, 0.1]}},
                                     {"method": "bitfit", "label": "edge", "grid": {"trainer.warmup_steps": [4, 0]}}])
    comparison = load_comparison(path, overrides=["evaluation.split=validation"])
    # lora: the best is the smaller dropout, the next one halves it (the grid's ratio). edge: the best is 0 warm-up
    # steps; the step past it (-4) is not a valid recipe, so it is named and not searched.
    scores = {"lora-dropout0.2": 20.0, "lora-dropout0.1": 22.0, "edge-warmup_steps4": 20.0, "edge-warmup_steps0": 21.0}
    more, notes = extend_search(comparison, _searched(comparison, scores))
    assert [r.grid for r in more] == [{"method.dropout": 0.05}]
    assert len(notes) == 1 and notes[0].startswith("edge: edge-warmup_steps-4 past the grid's edge was not searched: ")
    # past the edge the score fell: the best is inside again, and nothing more is tried.
    assert extend_search(comparison, _searched(comparison, {**scores, "lora-dropout0.05": 21.0}))[0] == []


def test_search_then_seeds_end_to_end(tmp_path, base_file):
    """Two learning rates searched on a selection split carved from train, the better one trained with
    two seeds and scored on validation; two runs at a time; the report shows the search and the ties."""
    path = write_comparison(tmp_path, base=str(base_file), seeds=[1, 2], search={"selection_size": 4, "max_steps": 1, "extend": 0},
                            output_dir=str(tmp_path / "runs"), report=str(tmp_path / "cmp.md"),
                            methods=[{"method": "lora", "grid": {"trainer.learning_rate": [1e-5, 5e-3]}}])
    overrides = ["trainer.max_steps=2", "evaluation.max_samples=2", "evaluation.split=validation"]
    # In two sittings: the search alone, then the finals with --resume (the search runs are kept).
    assert main(["run", str(path), *overrides, "--jobs", "2", "--search-only"]) == 0
    assert [d.name for d in (tmp_path / "runs").iterdir() if (d / "run.json").is_file()] == []
    assert not (tmp_path / "cmp.md").exists()
    searched = {d.name: read_json(d / "run.json")["train_info"] for d in (tmp_path / "runs" / "search").iterdir()}
    assert main(["run", str(path), *overrides, "--jobs", "2", "--resume"]) == 0
    search = {d.name: read_json(d / "run.json") for d in (tmp_path / "runs" / "search").iterdir()}
    assert {name: r["train_info"] for name, r in search.items()} == searched, "kept, not trained again"
    assert set(search) == {"lora-learning_rate1e-05", "lora-learning_rate0.005"}
    for record in search.values():
        info = record["meta_info"]["dataset_info"]
        assert info["eval_split"] == "selection" and info["rows"] == {"train": 12, "validation": 4, "test": 4, "selection": 4}
        assert "baseline" not in record["eval"], "the search does not score the base model"
    scores = {name: r["eval"]["finetuned"]["rouge1"] for name, r in search.items()}
    best = max(scores, key=scores.get)  # the first of equals in grid order, as the comparison chooses
    if scores["lora-learning_rate1e-05"] == scores["lora-learning_rate0.005"]:
        best = "lora-learning_rate1e-05"
    finals = sorted(d.name for d in (tmp_path / "runs").iterdir() if (d / "run.json").is_file())
    assert finals == [f"{best}-seed1", f"{best}-seed2"], "only the chosen setting is trained per seed"
    final = read_json(tmp_path / "runs" / f"{best}-seed1" / "run.json")
    assert final["meta_info"]["dataset_info"]["eval_split"] == "validation"
    assert final["meta_info"]["dataset_info"]["rows"]["train"] == 16, "the final runs train on the whole train split"
    assert final["run_info"]["comparison"]["chosen_by"] == {"split": "selection", "metric": "rouge1",
                                                           "value": scores[best], "search_run": f"search/{best}"}
    assert (tmp_path / "runs" / "recipes" / f"{best}-seed2.out").is_file(), "side-by-side runs write their output to a file"
    assert final["meta_info"]["system_info"]["runs_side_by_side"] == 2, "their speed figures are marked as shared"
    report = (tmp_path / "cmp.md").read_text()
    assert "## Search" in report and "chosen |" in report and "## Ranking by ROUGE-1" in report
    assert "The search trained each point for 1 optimiser steps (`search.max_steps`), the runs above for 2" in report
    assert report.count("| lora |") == 2, "both searched points are listed"
    assert (tmp_path / "cmp_search.png").is_file()


def test_side_by_side_runs_without_mps_get_one_note(tmp_path, monkeypatch, capsys):
    """With an NVIDIA GPU (nvidia-smi on PATH) and no MPS control pipe, --jobs 2 prints the note once;
    with the pipe there, nothing."""
    from peftbench.compare import run as compare_run
    from peftbench.pipeline.device import nvidia_mps_running

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mps"))
    assert not nvidia_mps_running()
    (tmp_path / "mps").mkdir()
    (tmp_path / "mps" / "control").write_text("")
    assert nvidia_mps_running()
    (tmp_path / "mps" / "control").unlink()
    monkeypatch.setattr(compare_run.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(compare_run, "_Runner", stop)
    comparison = type("C", (), {"search": None})()
    monkeypatch.setattr(compare_run, "check_run_dirs", lambda *a, **k: None)
    with pytest.raises(Stop):
        compare_run.run_comparison(comparison, jobs=2)
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert out.count("nvidia-cuda-mps-control -d") == 1 and "2 runs will take turns on the GPU" in out
    (tmp_path / "mps" / "control").write_text("")
    with pytest.raises(Stop):
        compare_run.run_comparison(comparison, jobs=2)
    assert "nvidia-cuda-mps-control" not in capsys.readouterr().out


def test_speed_columns_measured_with_different_sharing_are_pointed_out(tmp_path):
    """Rows whose runs shared the GPU with different numbers of others get one note naming both."""
    records = three_methods()[:2]
    records[0]["meta_info"]["system_info"]["runs_side_by_side"] = 5
    records[1]["meta_info"]["system_info"]["runs_side_by_side"] = 12
    markdown = " ".join(render_markdown(load_runs([write_runs(tmp_path / "a", records)]), title="t").split())
    assert "different numbers of runs sharing the device (5 at once: lora; 12 at once: ia3)" in markdown
    alike = three_methods()[:2]
    same = " ".join(render_markdown(load_runs([write_runs(tmp_path / "b", alike)]), title="t").split())
    assert "sharing the device" not in same, "rows measured alike need no note"
    assert "ROUGE-Lsum puts one sentence per line" in same, "the report says how ROUGE-Lsum is computed"


def test_merge_target_is_shown_only_for_a_4_bit_base(tmp_path):
    """merge_into chooses the weights of a 4-bit base; IA3 on a 16-bit base has the option but it did not act."""
    records = [fake_record("qlora", "qlora", rouge1=30.0, gguf=29.5), fake_record("ia3", "ia3", rouge1=28.0, gguf=27.9)]
    records[0]["run_info"]["recipe"]["method"]["merge_into"] = "nf4_roundtrip"
    records[1]["run_info"]["recipe"]["method"].update(load_in_4bit=False, merge_into="nf4_roundtrip")
    gguf = render_markdown(load_runs([write_runs(tmp_path / "runs", records)]), title="t").split("## GGUF exports")[1]
    assert "| qlora | in the run | nf4_roundtrip |" in gguf and "| ia3 | in the run | — |" in gguf
