"""What broke on CPUs with AVX-512 BF16 and AMX, made testable on any CPU.

1. bitsandbytes 0.50 repacks 4-bit weights for fast CPU inference during an evaluation and never
   unpacks them, so training after the baseline evaluation had zero gradients (peftbench.compat.bitsandbytes).
2. A run that trains nothing must fail loudly instead of reporting the base model as "fine-tuned".
3. llama.cpp crashed (SIGSEGV) in its CPU weight repacking: llama.cpp now runs in a child process,
   where a crash is one failed check (peftbench.isolation).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.isolation import NativeCrash, run_isolated
from peftbench.files import read_json

# --- 1. 4-bit weights packed by an evaluation are trainable again --------------------------------


def test_a_4bit_layer_packed_for_inference_is_restored_exactly_before_training():
    """Simulates bitsandbytes' CPU packing on any CPU (the packing itself is plain torch) and checks
    that the guard gives training back the very bytes and quantisation state it had."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from peftbench.compat.bitsandbytes import guard_4bit_layers

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")  # quantises
    assert guard_4bit_layers(torch.nn.Sequential(layer)) == 1
    original_bytes = layer.weight.data.clone()
    original_absmax = layer.weight.quant_state.absmax.clone()

    x = torch.randn(3, 64)
    expected = layer(x.clone().requires_grad_(True)).detach()  # training mode, before any packing
    layer.eval()
    with torch.no_grad():
        layer(x)  # the guard remembers the original before bitsandbytes may pack
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        # This CPU has no AVX-512 BF16, so bitsandbytes did not pack: do what it does on one that has.
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu

    layer.train()
    x_train = x.clone().requires_grad_(True)
    out = layer(x_train)
    out.sum().backward()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, original_bytes), "the 4-bit weights changed across eval -> train"
    assert torch.equal(layer.weight.quant_state.absmax, original_absmax), "the scales were re-quantised"
    assert torch.equal(out.detach(), expected)
    assert x_train.grad is not None and x_train.grad.abs().sum() > 0, "no gradient passes the 4-bit layer"


def test_only_4bit_layers_on_the_cpu_get_the_guard():
    """bitsandbytes packs only on the CPU; on a GPU the hook is traced by torch.compile, where it recursed
    (bitsandbytes 0.50.2, torch 2.11). A layer elsewhere (here: on the meta device) stays unhooked."""
    import bitsandbytes as bnb

    from peftbench.compat.bitsandbytes import guard_4bit_layers

    elsewhere = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", device="meta")
    assert elsewhere.weight.device.type == "meta"
    assert guard_4bit_layers(torch.nn.Sequential(elsewhere)) == 0
    assert not elsewhere._forward_pre_hooks


def test_qlora_run_learns_after_its_baseline_evaluation(tmp_path, write_recipe):
    """The quickstart's order (baseline evaluation, then training) on a 4-bit base. On a CPU with
    AVX-512 BF16 this is exactly what trained nothing before the fix."""
    recipe = write_recipe({"name": "qlora", "r": 4}, evaluation={"baseline": True, "max_samples": 2})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=3",
                 "trainer.learning_rate=0.01"]) == 0
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "success" and "baseline" in record["eval"]
    grad_norms = [h["grad_norm"] for h in record["train_info"]["metrics"] if "grad_norm" in h]
    assert grad_norms and all(g > 0 for g in grad_norms), grad_norms

    from safetensors.torch import load_file

    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name), "lora_B never left zero"


# --- 2. a run that learns nothing fails loudly ---------------------------------------------------


def test_a_run_whose_gradients_are_zero_stops_with_one_line_and_a_failed_record(tmp_path, write_recipe, monkeypatch,
                                                                                capsys):
    from peftbench_plugins.methods.lora import Lora

    apply = Lora.apply

    def apply_with_dead_gradients(self, model, options, ctx):
        # What a 4-bit base without autograd did: every gradient that reaches the adapter is zero.
        model = apply(self, model, options, ctx)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(torch.zeros_like)
        return model

    monkeypatch.setattr(Lora, "apply", apply_with_dead_gradients)
    recipe = write_recipe({"name": "lora", "r": 2}, evaluation={"baseline": False, "max_samples": 2})
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=5"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "training is not learning" in out and "exactly 0 in each of the first 3 optimiser steps" in out
    assert "peftbench doctor" in out and "Traceback" not in out
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "failed"
    assert record["run_info"]["stages"]["train"]["status"] == "failed"
    assert record["run_info"]["error_msg"].startswith("TrainingNotLearning: training is not learning")
    assert not (run_dir / "adapter").exists() and "finetuned" not in record["eval"]


def test_unchanged_parameters_after_training_are_an_error():
    from peftbench_plugins.trainers.hf import TrainingNotLearning, learning_guard

    model = torch.nn.Linear(4, 4)
    guard = learning_guard(model)
    guard.on_train_begin(None, None, None)
    guard.on_step_end(None, None, None)
    with pytest.raises(TrainingNotLearning, match="exactly as they started"):
        guard.on_train_end(None, None, None)

    guard = learning_guard(model)
    guard.on_train_begin(None, None, None)
    guard.on_step_end(None, None, None)
    with torch.no_grad():
        model.weight.add_(1e-3)
    guard.on_train_end(None, None, None)  # moved: fine
    resumed_at_the_end = learning_guard(model)
    resumed_at_the_end.on_train_begin(None, None, None)
    resumed_at_the_end.on_train_end(None, None, None)  # no step ran in this process: nothing to judge


# --- 3. native crashes are contained -------------------------------------------------------------


def crash_with(signum: int, progress=None):
    """Dies the way a native crash does: by a signal, with no Python exception."""
    progress(1)
    os.kill(os.getpid(), signum)


def answer(value, progress=None):
    progress(2)
    return {"value": value}


def refuse(progress=None):
    raise PeftbenchError("the file is not a GGUF.", "pass a .gguf file.")


def test_a_segfault_in_the_child_is_one_error_naming_the_signal_and_the_fix():
    seen = []
    with pytest.raises(NativeCrash) as caught:
        run_isolated(crash_with, signal.SIGSEGV, what="llama.cpp answering", fix="set X=0", progress=seen.append)
    assert caught.value.problem == "llama.cpp answering was killed by SIGSEGV (a crash in native code)."
    assert caught.value.fix == "set X=0" and seen == [1]


def test_the_child_returns_results_progress_and_user_errors():
    seen = []
    assert run_isolated(answer, 7, what="x", fix="y", progress=seen.append) == {"value": 7} and seen == [2]
    with pytest.raises(PeftbenchError, match="not a GGUF") as caught:
        run_isolated(refuse, what="x", fix="y")
    assert not isinstance(caught.value, NativeCrash) and caught.value.fix == "pass a .gguf file."


def wait_or_crash(signum: int, progress=None):
    if signum:
        os.kill(os.getpid(), signum)
    time.sleep(600)


def test_a_crash_in_one_of_several_side_by_side_children_stops_the_others():
    """The smoke test's workers: one dies, the error names it, and no sibling is left running."""
    import multiprocessing

    from peftbench.isolation import run_isolated_side_by_side

    with pytest.raises(NativeCrash, match="killed by SIGSEGV"):
        run_isolated_side_by_side(wait_or_crash, [(0,), (signal.SIGSEGV,), (0,)], what="llama.cpp answering", fix="f")
    assert multiprocessing.active_children() == []


def test_side_by_side_children_return_results_in_order_with_all_progress():
    from peftbench.isolation import run_isolated_side_by_side

    seen = []
    assert run_isolated_side_by_side(answer, [(1,), (2,), (3,)], what="x", fix="y", progress=seen.append) == [
        {"value": 1}, {"value": 2}, {"value": 3}]
    assert seen == [2, 2, 2]


def crashing_answers(*args, progress=None, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_llama_cpp_crash_in_the_smoke_test_is_a_failed_check(tmp_path, monkeypatch):
    """The exporters' smoke test: a crash is a problem line, and the caller (the run) goes on."""
    from peftbench.pipeline.recipe import PromptSection
    from peftbench_plugins.gguf.smoke import smoke_test

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr("peftbench_plugins.gguf.smoke.answer_examples", crashing_answers)
    with pytest.raises(NativeCrash, match="killed by SIGSEGV") as caught:
        smoke_test(gguf, [{"id": "a", "dialogue": "A: hi", "summary": "A greets."}], PromptSection())
    assert "PEFTBENCH_LLAMA_EXTRA_BUFFERS=0" in caught.value.fix


def test_smoke_command_reports_a_crash_in_one_line(tmp_path, tiny_data_dir, monkeypatch, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr("peftbench_plugins.gguf.smoke.answer_examples", crashing_answers)
    assert main(["smoke", str(gguf), "--data", str(tiny_data_dir), "-n", "1"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "was killed by SIGSEGV" in out and "Traceback" not in out


def test_extra_buffers_are_off_on_cpus_with_amx_or_avx512(monkeypatch):
    from peftbench_plugins.gguf import llama as smoke

    monkeypatch.delenv("PEFTBENCH_LLAMA_EXTRA_BUFFERS", raising=False)
    monkeypatch.setattr(smoke, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_int8"})
    assert smoke.use_extra_buffers() is False
    monkeypatch.setattr(smoke, "cpu_flags", lambda: {"avx2", "fma"})
    assert smoke.use_extra_buffers() is True
    monkeypatch.setenv("PEFTBENCH_LLAMA_EXTRA_BUFFERS", "0")
    assert smoke.use_extra_buffers() is False


# --- doctor ------------------------------------------------------------------------------------


def test_doctor_trains_one_4bit_step_after_an_evaluation():
    from peftbench.doctor import check_4bit_training

    [check] = check_4bit_training()
    assert check.status == "OK", check


def test_doctor_fails_when_the_4bit_step_learns_nothing(monkeypatch):
    from peftbench import doctor

    monkeypatch.setattr(doctor, "one_4bit_training_step", lambda directory: (0.0, False))
    [check] = doctor.check_4bit_training()
    assert check.status == "FAIL" and "learns nothing" in check.detail and "lora" in check.fix


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads CPU flags")
def test_doctor_fails_without_the_guard_on_a_cpu_that_packs_4bit_weights(monkeypatch):
    """The real failure, where this CPU can show it (AVX-512 BF16: most current Xeons)."""
    from bitsandbytes.functional import has_avx512bf16

    from peftbench import doctor

    if not has_avx512bf16():
        pytest.skip("bitsandbytes packs 4-bit weights only on CPUs with AVX-512 BF16")
    monkeypatch.setattr("peftbench.compat.bitsandbytes.guard_4bit_layers", lambda model: 0)
    [check] = doctor.check_4bit_training()
    assert check.status == "FAIL" and "gradient norm 0" in check.detail


def test_doctor_generation_fails_in_one_line_when_llama_cpp_crashes(monkeypatch):
    from peftbench_plugins.gguf import doctor

    def crashed(*args, what, fix, **kwargs):
        raise NativeCrash(f"{what} was killed by SIGSEGV (a crash in native code).", fix)

    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(doctor, "run_isolated", crashed)
    [check] = doctor.check_llama_generation()
    assert check.status == "FAIL" and "SIGSEGV" in check.detail and "PEFTBENCH_LLAMA_EXTRA_BUFFERS" in check.fix


def test_doctor_generation_runs_the_offline_quantised_model():
    from peftbench_plugins.gguf import doctor

    pytest.importorskip("llama_cpp")
    [check] = doctor.check_llama_generation()
    assert check.status == "OK", check
