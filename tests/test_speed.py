"""peftbench_plugins.trainers.packing: packing, token-budget passes and the label-only loss compute the same function
as padded batches with transformers' own loss, values and gradients alike."""

from __future__ import annotations

import json

import pytest
import torch

from peftbench.pipeline.chat import IGNORE_INDEX, encode_example
from peftbench.pipeline.recipe import PromptSection
from peftbench_plugins.trainers.packing import (StepCollator, activation_bytes, checkpointing_needed, label_token_loss, packed_attention,
                             plan_steps, split_into_passes, varlen_attention_forward)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in (tiny_data_dir / "train.jsonl").read_text().splitlines()]
    prompt = PromptSection(max_source_tokens=256, max_target_tokens=32)
    examples = [encode_example(tokenizer, prompt, r["dialogue"], r["summary"]) for r in rows[:8]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer, examples


def test_passes_keep_order_and_respect_both_budgets():
    lengths = [5, 7, 3, 20, 2, 2, 2]
    groups = split_into_passes(lengths, max_tokens=10)
    assert [i for g in groups for i in g] == list(range(len(lengths)))
    for g in groups:  # within budget, unless one example alone exceeds it
        assert sum(lengths[i] for i in g) <= 10 or len(g) == 1
    assert [3] in groups  # the 20-token example runs on its own
    assert split_into_passes(lengths, max_examples=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_into_passes(lengths) == [list(range(len(lengths)))]
    assert split_into_passes([]) == []


def test_packed_pass_restarts_positions_and_keeps_every_label(tiny):
    _, tokenizer, examples = tiny
    step = StepCollator(tokenizer, pack=True)(examples)
    (one,) = step["passes"]
    lengths = [len(e["input_ids"]) for e in examples]
    assert one["input_ids"].shape == (1, sum(lengths))
    assert step["num_tokens"] == sum(lengths)
    starts = torch.tensor([0] + lengths).cumsum(0)
    assert one["cu_seq_lens_q"].tolist() == starts.tolist()
    assert one["max_length_q"] == max(lengths)
    assert (one["position_ids"][0, starts[:-1]] == 0).all()
    # Exactly each example's own next-token labels, none across an example boundary.
    expected = sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)
    assert step["num_label_tokens"] == expected == int((one["targets"] != IGNORE_INDEX).sum())
    flat_ids = one["input_ids"][0]
    assert (flat_ids[one["logits_positions"] + 1] == one["targets"][0]).all()


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("pack,max_tokens,max_examples", [(True, None, None), (True, 400, None), (False, None, 3)])
def test_step_loss_and_gradients_match_padded_transformers_loss(tiny, pack, max_tokens, max_examples):
    from transformers import DataCollatorForSeq2Seq

    model, tokenizer, examples = tiny
    model.zero_grad()
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(examples)
    reference = model(**padded).loss
    reference.backward()
    reference_grads = _grads(model).clone()
    model.zero_grad()

    step = StepCollator(tokenizer, pack=pack, max_tokens=max_tokens, max_examples=max_examples)(examples)
    assert len(step["passes"]) > 1 or (max_tokens is None and max_examples is None)
    total = 0.0
    for one in step["passes"]:
        loss = label_token_loss(model, one, step["num_label_tokens"])
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(_grads(model), reference_grads, rtol=1e-4, atol=1e-7)
    model.zero_grad()


def _reference_varlen(signature: str):
    """A CPU stand-in for torch's flash varlen kernel: SDPA on each sequence. ``signature`` picks
    the keyword style of torch 2.11+ (window_size, enable_gqa) or of torch 2.10 (is_causal)."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                qs.float(), ks.float(), vs.float(), is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1).to(q.dtype)
        return out

    if signature == "window":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale, enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert key.shape[1] == query.shape[1], "torch 2.10's kernel has no GQA: heads must be repeated"
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)
    return varlen_attn


@pytest.mark.parametrize("signature", ["window", "is_causal"])
def test_varlen_attention_function_matches_padded_model(tiny, monkeypatch, signature):
    """The attention function the GPU uses, run against a CPU stand-in for the kernel: reshapes,
    grouped-query heads, causality and the fp32 -> half cast all checked without a GPU."""
    from transformers import DataCollatorForSeq2Seq

    import peftbench_plugins.trainers.packing as speed

    model, tokenizer, examples = tiny
    monkeypatch.setattr(speed, "_varlen_kernel", lambda: _reference_varlen(signature))
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(examples)
    step = StepCollator(tokenizer, pack=True)(examples)
    with torch.no_grad():
        reference = model(**padded).loss.item()
        with packed_attention(model, enabled=True):
            assert model.config._attn_implementation == speed.VARLEN_ATTENTION
            packed = label_token_loss(model, step["passes"][0], step["num_label_tokens"]).item()
    assert model.config._attn_implementation != speed.VARLEN_ATTENTION  # restored for generation
    # fp32 q/k/v go to the kernel in bf16 (flash has no fp32), so agreement is to bf16 rounding.
    assert packed == pytest.approx(reference, rel=2e-2)


def test_compiled_layers_compute_the_same_step_and_are_undone(tiny_model_dir, tiny, monkeypatch):
    """trainer.compile: the decoder layers of a LoRA model run through torch.compile (dynamo and
    AOT autograd; the CPU test skips inductor's code generation) for passes of different lengths,
    with the eager step's loss and gradients, and are eager again afterwards (for generation)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import peftbench_plugins.trainers.packing as speed

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    _, tokenizer, examples = tiny
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    layers = speed.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    step = StepCollator(tokenizer, pack=False, max_examples=3)(examples)
    assert len({tuple(p["input_ids"].shape) for p in step["passes"]}) > 1  # several lengths: dynamic shapes

    def run_step():
        model.zero_grad()
        loss = sum(label_token_loss(model, p, step["num_label_tokens"]) for p in step["passes"])
        loss.backward()
        return loss.item(), _grads(model).clone()

    eager_loss, eager_grads = run_step()
    with speed.compiled_layers(model, enabled=True):
        assert all(layer._compiled_call_impl is not None for layer in layers)
        compiled_loss, compiled_grads = run_step()
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-6)


def test_compile_is_planned_only_where_inductor_can_generate_kernels(tiny):
    from datasets import Dataset

    from peftbench_plugins.trainers.hf import HfTrainerOptions

    model, tokenizer, examples = tiny
    dataset = Dataset.from_list(examples)
    assert not plan_steps(model, tokenizer, dataset, HfTrainerOptions(), "cpu").compile  # off by default
    for asked in (True, "auto"):
        plan = plan_steps(model, tokenizer, dataset, HfTrainerOptions(compile=asked), "cpu")
        assert not plan.compile and any("compile" in note and "-> off" in note for note in plan.notes)


def test_varlen_attention_refuses_a_padding_mask():
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="packed rows only"):
        varlen_attention_forward(None, q, q, q, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_plan_defaults_pack_without_checkpointing_on_cpu_and_lean_caps_passes(tiny):
    from peftbench_plugins.trainers.hf import HfTrainerOptions

    model, tokenizer, examples = tiny
    from datasets import Dataset

    dataset = Dataset.from_list(examples)
    default = plan_steps(model, tokenizer, dataset, HfTrainerOptions(), "cpu")
    assert not default.collator.pack and default.collator.max_examples == 4  # packing auto: off without a varlen kernel
    assert default.per_device_batch == 16 and default.grad_accum == 1 and not default.stock
    plan = plan_steps(model, tokenizer, dataset, HfTrainerOptions(packing=True), "cpu")
    assert plan.per_device_batch == 16 and plan.grad_accum == 1 and not plan.stock
    assert plan.collator.pack and not plan.gradient_checkpointing
    assert not plan.varlen_attention  # no flash kernel on the CPU: SDPA with a block-diagonal mask
    lean = plan_steps(model, tokenizer, dataset, HfTrainerOptions(packing=True, memory_lean=True), "cpu")
    assert lean.gradient_checkpointing and lean.collator.max_tokens <= 2048
    padded = plan_steps(model, tokenizer, dataset, HfTrainerOptions(packing=False, gradient_checkpointing=True), "cpu")
    assert not padded.collator.pack and padded.collator.max_examples == 4 and padded.gradient_checkpointing


def test_prompt_learning_methods_keep_the_plain_trainer_path(tiny_model_dir, tiny):
    from datasets import Dataset
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftbench_plugins.trainers.hf import HfTrainerOptions

    _, tokenizer, examples = tiny
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    plan = plan_steps(model, tokenizer, Dataset.from_list(examples), HfTrainerOptions(), "cpu")
    assert plan.stock and not plan.varlen_attention
    assert (plan.per_device_batch, plan.grad_accum) == (4, 4)


def test_checkpointing_estimate_grows_with_tokens_and_is_off_on_cpu(tiny):
    model, _, _ = tiny
    assert activation_bytes(model.config, 2000) == 2 * activation_bytes(model.config, 1000) > 0
    assert checkpointing_needed(model.config, 10**9, "cpu")[0] is False


def _train(model_dir, tokenizer, dataset, tmp_path, eval_dataset=None, **trainer_options):
    from types import SimpleNamespace

    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_model
    from peftbench_plugins.methods.lora import Lora
    from peftbench_plugins.trainers.hf import HfTrainer, HfTrainerOptions

    policy = resolve_policy("auto")
    method = Lora()
    options = method.Options(dropout=0.0)  # no randomness left but the data order, which the seed fixes
    ctx = SimpleNamespace(policy=policy, run_dir=tmp_path, resume=False, recipe=SimpleNamespace(recipe=SimpleNamespace(seed=3)))
    base = load_model(str(model_dir), policy)
    torch.manual_seed(0)  # the same LoRA initialisation in both runs
    model = method.apply(base, options, ctx)
    options = {"eval_steps": None, **trainer_options}
    result = HfTrainer().train(model, tokenizer, dataset, eval_dataset, HfTrainerOptions(
        max_steps=3, batch_size=2, grad_accum=2, learning_rate=0.5, warmup_steps=0, optim="sgd",
        logging_steps=1, save_steps=100, **options), ctx)
    return result


def test_packing_learns_what_padding_learns(tiny, tiny_model_dir, tmp_path):
    """Three optimiser steps through the hf trainer: packed one-pass steps and the padded
    batch x grad-accum steps see the same examples and give the same losses step by step. Plain
    SGD, because Adam's first steps follow the sign of each gradient element, which rounding can
    flip where an element is near zero."""
    from datasets import Dataset

    _, tokenizer, examples = tiny
    dataset = Dataset.from_list(examples * 2)
    packed = _train(tiny_model_dir, tokenizer, dataset, tmp_path / "packed", eval_dataset=Dataset.from_list(examples),
                    eval_steps=3, packing=True)
    padded = _train(tiny_model_dir, tokenizer, dataset, tmp_path / "padded", eval_dataset=Dataset.from_list(examples),
                    eval_steps=3, packing=False)
    curve = lambda r: [h["loss"] for h in r.loss_history if "loss" in h]  # noqa: E731
    assert len(curve(packed)) == 3 and curve(packed)[-1] < curve(packed)[0] - 1e-3  # it did learn
    assert curve(packed) == pytest.approx(curve(padded), rel=1e-4)
    # The validation loss goes through the same packed passes.
    eval_loss = lambda r: [h["eval_loss"] for h in r.loss_history if "eval_loss" in h]  # noqa: E731
    assert len(eval_loss(packed)) == 1 and eval_loss(packed) == pytest.approx(eval_loss(padded), rel=1e-4)
    # 3 steps of 4 examples each: the non-pad tokens of 12 examples, the same ones both ways.
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert packed.tokens_seen == padded.tokens_seen
    assert 12 * lengths[0] <= packed.tokens_seen <= 12 * lengths[-1]


def test_bench_models_keep_every_embedding_row_when_the_tokenizer_has_no_pad(tiny_model_dir, tmp_path):
    """Issue 13's NaN: with transformers 5.17's SmolLM2 tokenizer (eos <|im_start|>, no pad) bench_train
    took pad = <|im_start|> and built its random Llama with that pad_token_id, whose initialisation zeroes
    the token's embedding row; every example starts with that token and bf16 training went NaN at step 1
    on an H200 (benchmarks/results/2026-12-03/diag_nopad_after_fix_h200.log). Now the tokenizer's eos is the
    end-of-turn token and the bench model has no pad_token_id, so no row is zeroed."""
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train

    from peftbench.compat.transformers import complete_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None  # as transformers 5.17 builds it
    complete_special_tokens(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    bench_train.build_random_model(tmp_path, bench_train.TINY, tokenizer, "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.pad_token_id is None
    rows = model.get_input_embeddings().weight.norm(dim=1)
    assert bool((rows > 0).all()), f"zeroed embedding rows: {(rows == 0).nonzero().flatten().tolist()}"


def test_packed_step_with_a_tokenizer_that_had_no_pad_token(tiny):
    """The packed path never pads, so a tokenizer without a pad token (transformers 5.17's SmolLM2, after
    complete_special_tokens) gives the same finite loss and gradients as the padded reference."""
    from copy import deepcopy

    from transformers import DataCollatorForSeq2Seq

    from peftbench.compat.transformers import complete_special_tokens

    model, tokenizer, examples = tiny
    no_pad = deepcopy(tokenizer)
    no_pad.eos_token, no_pad.pad_token = "<|im_start|>", None  # as transformers 5.17 builds it
    complete_special_tokens(no_pad)
    model.zero_grad()
    reference = model(**DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(examples)).loss
    reference.backward()
    reference_grads = _grads(model).clone()
    model.zero_grad()
    step = StepCollator(no_pad, pack=True)(examples)
    loss = sum(label_token_loss(model, one, step["num_label_tokens"]) for one in step["passes"])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert bool(torch.isfinite(_grads(model)).all())
    torch.testing.assert_close(_grads(model), reference_grads, rtol=1e-4, atol=1e-7)
    model.zero_grad()


def test_step_trainer_clips_the_step_like_the_stock_trainer_and_returns_to_training(tiny_model_dir, tiny, tmp_path):
    """StepTrainer clips over the trainable tensors it listed once, instead of a walk over every module each
    step: the same norm and the same clipped gradients as transformers' own _clip_grad_norm. And a step after
    an evaluation trains (dropout on) although it no longer calls model.train() when already training."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from peftbench_plugins.trainers.packing import step_trainer_class

    _, tokenizer, examples = tiny
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_grad_norm=0.5, report_to="none")
    trainer = step_trainer_class()(model=model, args=args, processing_class=tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    grads = [3 * torch.randn_like(p) for p in trainable]

    def clipped(clip):
        for p, g in zip(trainable, grads):
            p.grad = g.clone()
        return float(clip(model)), [p.grad.clone() for p in trainable]

    ours, ours_grads = clipped(trainer._clip_grad_norm)
    stock, stock_grads = clipped(lambda m: Trainer._clip_grad_norm(trainer, m))
    assert ours == pytest.approx(stock, rel=1e-6) and ours > 0.5  # the norm before clipping, so it did clip
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, stock_grads))
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ours_grads]))) == pytest.approx(0.5, rel=1e-4)

    model.eval()
    batch = StepCollator(tokenizer)(examples[:2])
    trainer.create_optimizer()
    trainer.training_step(model, batch)
    assert model.training and all(m.training for m in model.modules())


def test_spy_summary_keeps_kernel_launches_and_leaves_out_compiling():
    """benchmarks/diagnostics/spy_summary.py: samples that launch compiled kernels (torch/_inductor/runtime) are step time and
    stay; samples under dynamo's or inductor's compiler are left out; the backward thread is counted apart."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "diagnostics"))
    from spy_summary import summarise

    loop = "main (b.py:1);Trainer._inner_training_loop (transformers/trainer.py:1602)"
    raw = [
        f"{loop};training_step (p.py:4);run (torch/_inductor/runtime/triton_heuristics.py:1495) 6",
        f"{loop};Optimizer8bit.step (bitsandbytes/optim/optimizer.py:334) 2",
        f"{loop};training_step (p.py:4);_compile (torch/_dynamo/convert_frame.py:900) 50",
        "CompiledFunction.backward (torch/_functorch/_aot_autograd/runtime_wrappers.py:2748) 3",
    ]
    text = summarise(raw, top=10)
    assert text.splitlines()[0].startswith("samples: 8 in the training loop, 3 in compiled backward")
    assert "50 compiling" in text
    assert " 75.0%  training_step p.py:4" in text and " 25.0%  Optimizer8bit.step optimizer.py:334" in text


def test_bench_train_reports_a_run_whose_process_died_and_one_that_raised(tiny_model_dir, tmp_path):
    """bench_train runs each run in a process of its own (run_isolated): a run that dies without a result (here
    its process exits at once on a bad argument; on the H200 one segfaulted) and a run that raises (no model
    where it is told to look) come back as errors instead of taking the other runs with them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train

    died = bench_train.run_isolated("lora", tiny_model_dir, 1, 1.0, ["--small", "--no-such-option"])
    assert "exited with status 2 before writing a result" in died["error"]
    raised = bench_train.run_isolated("lora", tmp_path / "no-model", 1, 1.0,
                                      ["--small", "--tokenizer", str(tiny_model_dir), "--heldout", "2"])
    assert set(raised) == {"error"} and raised["error"].split(":")[0].endswith("Error")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(128, 256), (96, 40)])  # the second ends in a short block of each kind
def test_fused_4bit_dequantisation_is_bitsandbytes_bit_for_bit(nested, shape):
    """trainer.compile on a GPU: 4-bit layers dequantise through packing.dequantize_nf4 (tensor operations that
    inductor fuses) instead of bitsandbytes' ops. The weight is bitsandbytes' exactly, NF4 and FP4, with and without
    double quantisation; the layer's output and input gradient are those of bitsandbytes' own Linear4bit."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    import peftbench_plugins.trainers.packing as speed

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for dtype in (torch.bfloat16, torch.float32):
            weight = torch.randn(*shape, dtype=dtype)
            packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
            extra = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if nested else None
            ours = speed.dequantize_nf4(packed, state.absmax, state.code, tuple(state.shape), state.dtype, state.blocksize, extra)
            assert ours.dtype == dtype and torch.equal(ours, dequantize_4bit(packed, state))

    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(torch.randn(*shape), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, blocksize=64)._quantize("cpu")
    layer.train()
    x = torch.randn(2, 5, shape[1], requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    speed.install_fused_4bit(layer)
    try:
        got = layer(x)
        (got_grad,) = torch.autograd.grad(got.square().sum(), x)
        # Compiled, with the partitioner inductor uses (min-cut), backward keeps the packed weight and its scales,
        # never the dequantised weight (it did, a bf16 copy of every 4-bit weight, before the selective checkpoint).
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd

        eager = lambda graph, _: make_boxed_func(graph.forward)  # noqa: E731
        backend = aot_autograd(fw_compiler=eager, bw_compiler=eager, partition_fn=min_cut_rematerialization_partition)
        torch._dynamo.reset()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            compiled = torch.compile(layer, dynamic=True, backend=backend)(x)
        (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    finally:
        speed.remove_fused_4bit(layer)
    assert "forward" not in vars(layer) and not hasattr(layer, "_peftbench_nf4")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert saved and all(t.numel() <= layer.weight.numel() for t in saved), [(t.shape, t.dtype) for t in saved]
    assert not speed._fusable_4bit_layers(layer)  # only GPU layers are switched by the trainer
