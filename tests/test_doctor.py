"""`peftbench doctor`: one line per check, OK/WARN/FAIL with a fix, exit 1 only when a required part fails."""

from __future__ import annotations

import importlib.util
import platform
from importlib import metadata

import pytest
import torch

from peftbench import doctor
from peftbench.cli import main
from peftbench_plugins.gguf import doctor as gguf_doctor


def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_reports_every_part_of_the_environment(capsys):
    code = main(["doctor"])
    out = capsys.readouterr().out
    checks = _by_name(doctor.run_checks())
    for name in ("python", "torch", "transformers", "peft", "cuda", "bf16", "bitsandbytes", "llama-cpp-python",
                 "offline model", "disk (runs)", "disk (cache)"):
        assert name in checks, name
        assert name in out, name
    assert code == doctor.exit_code(list(checks.values())) == 0, out
    assert "peftbench doctor" in out and "ready" in out
    assert checks["python"].detail.startswith(platform.python_version())
    assert checks["torch"].detail == metadata.version("torch")
    for c in checks.values():
        assert c.status in ("OK", "WARN", "FAIL")
        assert c.status == "OK" or c.fix, f"{c.name} is {c.status} without a fix"
    if not torch.cuda.is_available():
        assert checks["cuda"].status == "WARN" and "CPU" in checks["cuda"].detail
        assert not any(name.startswith("gpu ") for name in checks)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_four_bit_layer_really_runs():
    (check,) = doctor.check_4bit()
    assert check.name == "4-bit" and check.status == "OK", check
    assert "relative quantisation error" in check.detail


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_a_broken_bitsandbytes_fails_with_a_fix(monkeypatch, capsys):
    import bitsandbytes as bnb

    def broken(self, x):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nlong diagnostics")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", broken)
    (check,) = doctor.check_4bit()
    assert check.status == "FAIL"
    assert "RuntimeError: CUDA Setup failed despite GPU being available." in check.detail
    assert "reinstall bitsandbytes" in check.fix and "method lora" in check.fix
    assert main(["doctor"]) == 1
    assert "required check(s) failed" in capsys.readouterr().out


def test_a_missing_or_old_required_package_fails(monkeypatch):
    real_version = metadata.version

    def version(name):
        if name == "peft":
            raise metadata.PackageNotFoundError(name)
        if name == "transformers":
            return "4.0.0"
        return real_version(name)

    monkeypatch.setattr(doctor.metadata, "version", version)
    monkeypatch.setattr(doctor, "_minimum_versions", lambda: {"transformers": ">=4.56", "peft": ">=0.17"})
    checks = _by_name(doctor.check_packages())
    assert (checks["peft"].status, checks["peft"].detail, checks["peft"].fix) == ("FAIL", "not installed", "pip install 'peft>=0.17'")
    assert checks["transformers"].status == "FAIL" and checks["transformers"].detail == "4.0.0 (peftbench needs >=4.56)"
    assert doctor.exit_code(list(checks.values())) == 1


def test_optional_parts_only_warn(monkeypatch):
    real_version = metadata.version

    def version(name):
        if name in ("bitsandbytes", "llama-cpp-python"):
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(doctor.metadata, "version", version)
    monkeypatch.setattr(doctor, "LOW_DISK_BYTES", 2**62)
    checks = doctor.check_bitsandbytes() + gguf_doctor.check_llama_cpp() + doctor.check_disk()
    assert [c.status for c in checks] == ["WARN"] * len(checks)
    assert "peftbench[quant]" in checks[0].fix and "peftbench[gguf]" in checks[1].fix
    assert doctor.exit_code(checks) == 0


def test_a_crashing_check_is_a_fail_line_not_a_traceback(monkeypatch):
    def crashing():
        raise OSError("driver went away")

    checks = doctor.run_checks([doctor.check_python, crashing])
    assert checks[-1].name == "crashing" and checks[-1].status == "FAIL"
    assert checks[-1].detail == "the check crashed: OSError: driver went away"
