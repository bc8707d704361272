"""Resource checks: free disk before the adapter and exports, CUDA out-of-memory as a fix to try."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from peftbench.pipeline import resources
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.pipeline.recipe import load_recipe
from peftbench.files import read_json

QUICK = {"evaluation": {"baseline": False, "max_samples": 1, "max_new_tokens": 2}}
DiskUsage = namedtuple("DiskUsage", "total used free")


def _free_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: DiskUsage(10 * free, 9 * free, free))


def test_disk_check_names_the_numbers_and_a_fix(tmp_path, monkeypatch):
    resources.ensure_free_disk(tmp_path, 1000, "the adapter")  # plenty here
    _free_disk(monkeypatch, 100 * 2**20)
    with pytest.raises(PeftbenchError) as err:
        resources.ensure_free_disk(tmp_path / "not" / "made" / "yet", 2 * 2**30, "the gguf export")
    assert err.value.problem == (f"not enough free disk for the gguf export in '{tmp_path}/not/made/yet': "
                                 "needs about 2.2 GiB, 100.0 MiB free.")
    assert "free 2.1 GiB on that disk" in err.value.fix and "--resume" in err.value.fix


def test_estimates_follow_the_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert resources.trainable_bytes(model) == 4 * trainable  # fp32 adapter weights
    assert resources.merged_model_bytes(model) == 2 * total  # a 16-bit merged checkpoint


def test_too_little_disk_for_the_adapter_fails_before_writing(write_recipe, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_disk_usage = shutil.disk_usage

    def disk_usage(path):  # the checkpoints fit; then the disk is full
        usage = real_disk_usage(path)
        return DiskUsage(usage.total, usage.total - 4096, 4096)

    monkeypatch.setattr(resources.shutil, "disk_usage", disk_usage)
    recipe = write_recipe({"name": "lora", "r": 2}, **QUICK)
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=1"]) == 2
    out = capsys.readouterr().out
    assert "not enough free disk for the adapter" in out and "4.0 KiB free" in out
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "failed" and record["run_info"]["stages"]["save_adapter"]["status"] == "failed"
    assert not (run_dir / "adapter").exists()


def test_cuda_out_of_memory_in_training_suggests_memory_lean_settings(write_recipe, tmp_path, monkeypatch, capsys):
    import transformers

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 22.2 GiB total)\nmore detail")

    monkeypatch.setattr(transformers.Trainer, "train", out_of_memory)
    run_dir = tmp_path / "run"
    recipe = write_recipe({"name": "lora", "r": 2}, trainer={"batch_size": 8, "grad_accum": 2}, **QUICK)
    assert main(["run", str(recipe), "--output-dir", str(run_dir)]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: out of GPU memory during training (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 22.2 GiB total)). "
        "Fix: use memory-lean settings (now batch_size=8, grad_accum=2): trainer.batch_size=4 trainer.grad_accum=4 "
        "(same effective batch), trainer.gradient_checkpointing=true, and/or method qlora (4-bit base); a shorter "
        "prompt.max_source_tokens also helps. Then run again with --overwrite."
    ]
    stage = read_json(run_dir / "run.json")["run_info"]["stages"]["train"]
    assert stage["status"] == "failed" and stage["error"].startswith("PeftbenchError: out of GPU memory during training")


def test_cuda_out_of_memory_in_evaluation_suggests_a_smaller_batch(write_recipe):
    recipe = load_recipe(write_recipe(evaluation={"batch_size": 6}))
    with pytest.raises(PeftbenchError) as err:
        with resources.out_of_memory_as_error("baseline_eval", recipe):
            raise torch.OutOfMemoryError("CUDA out of memory.")
    assert err.value.problem == "out of GPU memory during baseline_eval (CUDA out of memory.)."
    assert err.value.fix.startswith("lower evaluation.batch_size (now 6, e.g. evaluation.batch_size=3)")
    with pytest.raises(ValueError):  # other errors pass through untouched
        with resources.out_of_memory_as_error("training", recipe):
            raise ValueError("not memory")
