"""No result lost: atomic writes, a failing export leaves the adapter and run.json intact, an
interrupted run is recorded as interrupted."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from peftbench.cli import main
from peftbench.api import ExporterPlugin, ExportResult, TrainerPlugin
from peftbench.api import hookimpl
from peftbench.host import registered
from peftbench.files import atomic_directory, atomic_write_text, read_json
from peftbench.testing import tiny_recipe
from peftbench_plugins.methods.lora import Lora

QUICK = {"evaluation": {"baseline": False, "max_samples": 1, "max_new_tokens": 2}}


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic_write_text(target, "finished result")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "half of a new one")
    assert target.read_text() == "finished result"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"], "no temporary file is left behind"


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    adapter = tmp_path / "adapter"
    with atomic_directory(adapter) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(adapter) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise RuntimeError("killed mid-save")
    assert [p.name for p in adapter.iterdir()] == ["weights"] and (adapter / "weights").read_text() == "v1"
    with atomic_directory(adapter) as tmp:
        (tmp / "other").write_text("v3")
    assert [p.name for p in adapter.iterdir()] == ["other"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary directory is left behind"


# --- a failing stage ----------------------------------------------------------------------------


class BrokenExporter(ExporterPlugin):
    name = "test_broken"

    def export(self, options, ctx):
        ctx.exports_dir.mkdir(parents=True, exist_ok=True)
        (ctx.exports_dir / "partial.bin").write_bytes(b"\0" * 8)
        raise RuntimeError("converter crashed")


class HugeExporter(ExporterPlugin):
    """Needs more disk than any machine has: the runner must refuse before calling export()."""

    name = "test_huge"
    called = False

    def estimated_bytes(self, options, ctx) -> int:
        return 2**60

    def export(self, options, ctx):
        HugeExporter.called = True
        return ExportResult(files={})


class FailingExporters:
    @staticmethod
    @hookimpl
    def peftbench_register_exporters(register):
        register(BrokenExporter)
        register(HugeExporter)


def test_failing_exports_leave_the_adapter_and_record_intact(write_recipe, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    with registered(FailingExporters):
        recipe = write_recipe({"name": "lora", "r": 2}, exporters=[{"name": "test_broken"}, {"name": "adapter"},
                                                                    {"name": "test_huge"}], **QUICK)
        assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=2"]) == 0

    record = read_json(run_dir / "run.json")
    stages = record["run_info"]["stages"]
    assert record["run_info"]["status"] == "success"
    assert stages["export:test_broken"]["status"] == "failed"
    assert stages["export:test_broken"]["error"] == "RuntimeError: converter crashed"
    assert stages["export:adapter"]["status"] == "success", "the exports after a failed one still run"
    assert stages["export:test_huge"]["status"] == "failed" and not HugeExporter.called
    assert "not enough free disk for the test_huge export" in stages["export:test_huge"]["error"]
    assert all(stages[s]["status"] == "success" for s in ("train", "save_adapter", "finetuned_eval"))
    assert record["eval"]["finetuned"]["n"] == 1 and record["train_info"]["steps"] == 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
    assert any("lora_B" in n for n, _ in model.named_parameters())
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "no temporary files left in the run dir"


class BreaksOnSave(Lora):
    name = "test_breaks_on_save"

    def save(self, model, directory):
        super().save(model, directory)
        raise OSError(28, "No space left on device")


class BreakingMethod:
    @staticmethod
    @hookimpl
    def peftbench_register_methods(register):
        register(BreaksOnSave)


def test_a_failed_adapter_save_leaves_no_half_adapter(write_recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with registered(BreakingMethod):
        recipe = write_recipe({"name": "test_breaks_on_save", "r": 2}, **QUICK)
        assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "the disk is full during the adapter save" in out and "No space left on device" in out and "--resume" in out
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "failed"
    assert record["run_info"]["stages"]["save_adapter"]["status"] == "failed"
    assert "No space left on device" in record["run_info"]["error_msg"]
    assert not (run_dir / "adapter").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".adapter")]
    assert (run_dir / "checkpoints" / "checkpoint-1").is_dir(), "the trained state survives for --resume"


# --- interruption -------------------------------------------------------------------------------


class StoppedTrainer(TrainerPlugin):
    """Receives SIGTERM mid-training, as a pre-empted VM's job does."""

    name = "test_sigterm"

    def train(self, model, tokenizer, train_dataset, eval_dataset, options, ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal handler interrupts this
        raise AssertionError("SIGTERM did not interrupt training")


class StoppedPlugins:
    @staticmethod
    @hookimpl
    def peftbench_register_trainers(register):
        register(StoppedTrainer)


def test_sigterm_or_ctrl_c_marks_the_run_interrupted(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    recipe = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "lora", "r": 2}, **QUICK)
    recipe["trainer"] = {"name": "test_sigterm"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    with registered(StoppedPlugins):
        assert main(["run", str(path), "--output-dir", str(run_dir)]) == 130
    assert signal.getsignal(signal.SIGTERM) == previous, "the handler is put back"
    assert "interrupted" in capsys.readouterr().out
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "interrupted"
    assert record["run_info"]["stages"]["train"] | {"seconds": None} == {
        "status": "failed", "error": "KeyboardInterrupt: SIGTERM", "seconds": None}
    assert record["run_info"]["stages"]["method"]["status"] == "success"
