"""Training throughput, memory and loss: the lesson's pipeline against peftbench's defaults.

One invocation trains, on the same examples in the same order (so the same non-pad tokens):
  baseline    the lesson's pipeline, written the lesson's way: HF Trainer, QLoRA NF4 with double
              quantisation and bf16 compute, LoRA r8 on q/v, batch 4 x grad-accum 4, paged 8-bit
              AdamW, gradient checkpointing, padding to the longest in the batch
  qlora       peftbench's qlora method and hf trainer at their defaults (the qlora_samsum recipe)
  qlora_lean  the same with the trainer's memory_lean: true
  lora        peftbench's lora method (bf16 base) and hf trainer at their defaults
and prints non-pad tokens/s, peak allocated/reserved memory, MFU, final loss and each as a ratio to
the baseline; everything also goes to a JSON file.

  # the GPU (Llama-3.2-1B shape, random weights, SAMSum train dialogues):
  python benchmarks/bench_train.py --device cuda --data .cache/bench/samsum/train.jsonl \\
      --tokenizer .cache/bench/tokenizer --out benchmarks/results/bench_train.json
  # the CPU, a tiny shape, to check the script itself:
  python benchmarks/bench_train.py --small
  # loss equivalence with real weights (a chat model directory or .gguf), curves to a PNG:
  python benchmarks/bench_train.py --model SmolLM2-135M-Instruct.Q4_1.gguf --runs baseline,qlora,qlora_seed2 ...
  # the SmolLM2-135M shape with random weights (throughput and memory need no real weights):
  python benchmarks/bench_train.py --shape smollm2 ...
  # a run with options changed: NAME+option=value+..., trainer options (compile, optim, ...) or the
  # method's (upcast_fp32, ...); round four's qlora defaults, say:
  python benchmarks/bench_train.py --runs baseline,qlora,qlora+upcast_fp32=true+compile=false ...

Speeds depend on the card and on the host that launches its kernels, and both change from one start of a
lent machine to the next: every ratio printed is to the baseline run of the same invocation, and the card's
name is printed with the figures (and written to the JSON file's "device").

Throughput needs no real weights: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096,
                rope_theta=500000.0)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=1024)
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (datasheet, no sparsity)
EXAMPLES_PER_STEP = 16  # batch 4 x grad-accum 4, as in the lesson
TIMING_WARMUP_STEPS = 5  # steps left out of the timing (allocator, cuBLAS, bitsandbytes, torch.compile warm-up)
PROFILED_STEPS = 3  # the last steps: profiled in peftbench runs, so left out of every run's timing
SHAPES = {"llama-1b": LLAMA_1B, "smollm2": SMOLLM2_135M, "tiny": TINY}
SHAPE_TITLES = {"llama-1b": "Llama-3.2-1B", "smollm2": "SmolLM2-135M", "tiny": "tiny"}
LEARNING = dict(learning_rate=2e-4, warmup_steps=2, lr_scheduler="linear")  # the same schedule for every run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny model shape and few steps (the CPU check)")
    p.add_argument("--data", default=".cache/bench/samsum/train.jsonl", help="JSONL rows with dialogue and summary")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the SmolLM2 tokenizer)")
    p.add_argument("--model", default=None, help="real weights (directory or .gguf) instead of a random Llama-3.2-1B shape")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b",
                   help="the random-weight model's shape (without --model; --small means tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (16 examples each)")
    p.add_argument("--runs", default="baseline,qlora,qlora_lean,lora")
    p.add_argument("--learning-rate", type=float, default=LEARNING["learning_rate"],
                   help="peak learning rate of every run (higher makes learning visible in few steps)")
    p.add_argument("--heldout", type=int, default=64, help="held-out examples for the after-training loss")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 3 steps of each peftbench run")
    p.add_argument("--out", default="benchmarks/results/bench_train.json")
    p.add_argument("--plot", default=None, help="PNG of the loss curves")
    p.add_argument("--profile-out", default=None, help="text file for the profiler tables")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (default: each run in a process of its own, see run_isolated)")
    p.add_argument("--one-run", nargs=4, metavar=("NAME", "MODEL_DIR", "PARAMS", "PEAK_FLOPS"), help=argparse.SUPPRESS)
    p.add_argument("--one-run-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- data and model ------------------------------------------------------------------------------


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from peftbench.pipeline.modeling import resolve_package_file
        from peftbench.testing import OFFLINE_GGUF

        gguf = resolve_package_file(OFFLINE_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    from peftbench.compat.transformers import complete_special_tokens

    complete_special_tokens(tokenizer)  # transformers 5.17: eos <|im_start|>, no pad token (see there)
    return tokenizer


def load_examples(path: str, tokenizer, n: int):
    """The first ``n`` dialogues (empty ones skipped) through the chat template, 448 + 64 tokens."""
    from datasets import Dataset

    from peftbench.pipeline.chat import encode_example
    from peftbench.pipeline.recipe import PromptSection

    prompt = PromptSection(max_source_tokens=448, max_target_tokens=64)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["dialogue"].strip() and row["summary"].strip():
                rows.append(encode_example(tokenizer, prompt, row["dialogue"], row["summary"]))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path} holds only {len(rows)} usable rows, {n} needed")
    return Dataset.from_list(rows)


def build_random_model(directory: Path, shape: dict, tokenizer, device: str) -> int:
    """Save a randomly initialised Llama of ``shape``; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # No pad_token_id: Llama-3.2-1B's config has none, and with one the random init zeroes that
    # token's embedding row (issue 13's NaN: the pad was <|im_start|>, in every example).
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialising 1.2B parameters on the GPU takes a second, on the CPU a minute
        model = LlamaForCausalLM(config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    return params


def real_model(source: str, tokenizer_path) -> tuple[str, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftbench.pipeline.modeling import resolve_model_source

    directory = resolve_model_source(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return directory, sum(p.numel() for p in model.parameters())


def matmul_peak(device: str) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on the GPU (random data, median of 20)."""
    if device != "cuda":
        n, dtype, reps = 1024, torch.float32, 5
    else:
        n, dtype, reps = 8192, torch.bfloat16, 20
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


# --- timing --------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and tokens seen at the end of every optimiser step (GPU synchronised)."""

        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append((0, time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    return StepTimer()


def step_profiler(device: str, first_step: int, steps: int, sink: list):
    """torch.profiler over ``steps`` optimiser steps from ``first_step``; appends a summary to sink."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and self.prof is None:
                sync(device)
                self.prof = profile(activities=activities)
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first_step + steps:
                sync(device)
                wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                sink.append(summarise_profile(self.prof, wall, steps, device))
                self.prof = None

    return StepProfiler()


def summarise_profile(prof, wall: float, steps: int, device: str) -> dict:
    events = prof.key_averages()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)
    kernel_us = sum(getattr(e, attr, 0) for e in events if device != "cuda" or e.device_type.name == "CUDA")
    table = events.table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                         row_limit=25, max_name_column_width=70)
    if device == "cuda":  # launch-bound steps: where the host's time goes matters as much as the kernels
        table += "\n" + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    return {
        "steps": steps,
        "wall_s": round(wall, 4),
        "device_busy_s": round(kernel_us / 1e6, 4),
        "device_busy_fraction": round(kernel_us / 1e6 / wall, 3) if wall else None,
        "top": [{"name": e.key[:90], "self_s": round(getattr(e, attr, 0) / 1e6, 4), "calls": e.count} for e in rows[:15]],
        "table": table,
    }


# --- the runs ------------------------------------------------------------------------------------


def trainer_args_common(steps: int, seed: int) -> dict:
    return dict(max_steps=steps, logging_steps=1, seed=seed, data_seed=seed, report_to="none",
                dataloader_num_workers=0, remove_unused_columns=False)


def run_baseline(model_dir, tokenizer, dataset, steps, device, seed, callbacks):
    """The lesson's pipeline, written as the lesson writes it (not through peftbench)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=compute,
                                                 **({"device_map": {"": 0}} if device == "cuda" else {}))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(seed)  # the LoRA initialisation: the same in every run of one seed
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-baseline-"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
        learning_rate=LEARNING["learning_rate"], warmup_steps=LEARNING["warmup_steps"], lr_scheduler_type=LEARNING["lr_scheduler"],
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch", gradient_checkpointing=True,
        bf16=device == "cuda", use_cpu=device == "cpu", save_strategy="no",
        include_num_input_tokens_seen="non_padding", **trainer_args_common(steps, seed))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return trainer.state, {"gradient_checkpointing": True, "packing": False}, model


def run_peftbench(kind, model_dir, tokenizer, dataset, steps, device, seed, callbacks, overrides=None, **trainer_overrides):
    """peftbench's method plugin and hf trainer plugin, at their defaults (the qlora_samsum recipe's
    method settings: r8, alpha 16, q/v, dropout 0.05; batch 4 x grad-accum 4, paged 8-bit AdamW).
    ``overrides``: options changed (``run_function``), each the trainer's or else the method's."""
    from peftbench.pipeline.device import resolve_policy
    from peftbench.pipeline.modeling import load_model
    from peftbench_plugins.methods.lora import Lora
    from peftbench_plugins.methods.qlora import Qlora
    from peftbench_plugins.trainers.hf import HfTrainer, HfTrainerOptions

    policy = resolve_policy("auto")
    method = Qlora() if kind == "qlora" else Lora()
    method_overrides = {}
    for key, value in (overrides or {}).items():
        if key in HfTrainerOptions.model_fields:
            trainer_overrides[key] = value
        elif key in method.Options.model_fields:
            method_overrides[key] = value
        else:
            raise SystemExit(f"{key}: neither an hf trainer option nor a {kind} option")
    options = method.Options(**method_overrides)
    model = load_model(model_dir, policy, quantization_config=method.quantization_config(options, policy))
    ctx = SimpleNamespace(policy=policy, run_dir=Path(tempfile.mkdtemp(prefix=f"bench-{kind}-")), resume=False,
                          recipe=SimpleNamespace(recipe=SimpleNamespace(seed=seed)))
    torch.manual_seed(seed)  # the LoRA initialisation: the same in every run of one seed
    model = method.apply(model, options, ctx)
    trainer_options = HfTrainerOptions(
        max_steps=steps, batch_size=4, grad_accum=4, learning_rate=LEARNING["learning_rate"],
        warmup_steps=LEARNING["warmup_steps"], lr_scheduler=LEARNING["lr_scheduler"], logging_steps=1,
        save_steps=10**6, eval_steps=None, **trainer_overrides)
    captured = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):  # the Trainer state, which TrainResult summarises away
        def on_train_end(self, args, state, control, **kwargs):
            captured["state"] = state
            captured["gc"] = bool(args.gradient_checkpointing)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    HfTrainer().train(model, tokenizer, dataset, None, trainer_options, ctx, callbacks=[*callbacks, Capture()])
    return captured["state"], {"gradient_checkpointing": captured["gc"], "packing": trainer_options.packing,
                               "compile": trainer_options.compile, "optim": trainer_options.optim,
                               "overrides": dict(overrides or {}), "policy_notes": list(policy.substitutions)}, model


RUNS = {
    "baseline": lambda **kw: run_baseline(**kw),
    "qlora": lambda **kw: run_peftbench("qlora", **kw),
    "qlora_seed2": lambda **kw: run_peftbench("qlora", **{**kw, "seed": kw["seed"] + 1}),
    "qlora_lean": lambda **kw: run_peftbench("qlora", memory_lean=True, **kw),
    "lora": lambda **kw: run_peftbench("lora", **kw),
    # the trainer's compile option (torch.compile of the decoder layers); the first steps compile
    "qlora_compiled": lambda **kw: run_peftbench("qlora", compile=True, **kw),
    "qlora_lean_compiled": lambda **kw: run_peftbench("qlora", memory_lean=True, compile=True, **kw),
    "lora_compiled": lambda **kw: run_peftbench("lora", compile=True, **kw),
    # An experiment kept for re-measuring, not a trainer option: inductor's C++ wrapper instead of its generated Python,
    # which launches each compiled layer's kernels (42% of a compiled SmolLM2 step's host time). Slower on an H200.
    "lora_compiled_cpp": lambda **kw: _with_cpp_wrapper(run_peftbench, "lora", compile=True, **kw),
    "qlora_compiled_cpp": lambda **kw: _with_cpp_wrapper(run_peftbench, "qlora", compile=True, **kw),
    # Measured on an H200 on 2026-12-04: the C++ wrapper made compiled LoRA on SmolLM2 slower (31,860 against 53,872
    # tokens/s). Tried and left out: CUDA graphs over the compiled layers (inductor's reduce-overhead mode, packed rows
    # padded to 1024-token buckets) segfaulted in the first compiled backward (torch 2.11).
}


def run_function(name: str):
    """The run ``name`` names: one of RUNS, or ``RUN+option=value+...`` (a peftbench run with trainer or method
    options changed; values read as YAML: true, 16384, adamw_torch_fused); None for an unknown name."""
    base, *changes = name.split("+")
    if base not in RUNS or (changes and base == "baseline"):
        return None
    if not changes:
        return RUNS[base]
    import yaml

    overrides = {}
    for change in changes:
        key, eq, value = change.partition("=")
        if not eq or not key:
            return None
        overrides[key] = yaml.safe_load(value)
    return lambda **kw: RUNS[base](**{**kw, "overrides": {**kw.get("overrides", {}), **overrides}})


def _with_cpp_wrapper(run, *args, **kwargs):
    import torch._inductor.config

    with torch._inductor.config.patch(cpp_wrapper=True):
        return run(*args, **kwargs)


def packing_self_check(model_dir, tokenizer, dataset, device) -> dict:
    """The loss of one step's examples, padded + transformers' own loss against packed + peftbench's
    label-only loss (with the varlen kernel where there is one): the same function, up to rounding."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from peftbench_plugins.trainers.packing import StepCollator, label_token_loss, packed_attention, varlen_attention_available

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    features = [dataset[i] for i in range(EXAMPLES_PER_STEP)]
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)
    with torch.no_grad():
        reference = model(**{k: v.to(device) for k, v in padded.items()}).loss.float().item()
        step = StepCollator(tokenizer, pack=True)(features)
        varlen = varlen_attention_available(device)
        with packed_attention(model, varlen):
            packed = sum(label_token_loss(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.items()},
                                          step["num_label_tokens"]).item() for p in step["passes"])
    del model
    return {"padded_hf_loss": reference, "packed_label_loss": packed, "varlen_kernel": varlen,
            "relative_difference": abs(packed - reference) / abs(reference)}


def heldout_loss(model, tokenizer, dataset, device) -> float:
    """Mean loss over the summary tokens of held-out examples, computed the same way for every run
    (padded batches, transformers' own loss): what the run learned, measured on data it never saw."""
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for i in range(0, len(dataset), 8):
            batch = collate([dataset[j] for j in range(i, min(i + 8, len(dataset)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss.float().item()
            total, count = total + loss * n, count + n
    return total / count


def summarise(name, state, info, timer, device, params, peak_flops, wall) -> dict:
    history = [h for h in state.log_history if "loss" in h]
    marks = timer.marks  # index = optimiser steps done
    last = len(marks) - 1 - PROFILED_STEPS if len(marks) - 1 > TIMING_WARMUP_STEPS + PROFILED_STEPS else len(marks) - 1
    w = min(TIMING_WARMUP_STEPS, last - 1)
    tokens_timed = marks[last][2] - marks[w][2]
    seconds_timed = marks[last][1] - marks[w][1]
    tps = tokens_timed / seconds_timed if seconds_timed > 0 else float("nan")
    # Adapter training FLOPs per token: the forward pass is 2 x params (a multiply and an add per
    # weight), the backward pass another 2 x params for the gradients of the activations flowing
    # back through the frozen weights. Full fine-tuning would add 2 x params for weight gradients
    # (6N); the frozen base has none, and the adapter's own are negligible (0.07% of the params).
    # Recomputation under gradient checkpointing is not useful work and is not counted.
    flops_per_s = 4 * params * tps
    result = {
        "run": name,
        "steps": state.global_step,
        "tokens": marks[-1][2],
        "timed_steps": f"{w + 1}..{last}",
        "tokens_timed": tokens_timed,
        "seconds_timed": round(seconds_timed, 3),
        "train_wall_s": round(wall, 2),
        "tokens_per_s": round(tps, 1),
        "mfu_h100": round(flops_per_s / H100_BF16_PEAK, 4) if device == "cuda" else None,
        "mfu_measured_peak": round(flops_per_s / peak_flops, 4),
        "final_loss": history[-1]["loss"] if history else None,
        "loss_last5": round(sum(h["loss"] for h in history[-5:]) / max(len(history[-5:]), 1), 4) if history else None,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
        **info,
    }
    return result


RATIO_KEYS = ("tokens_per_s", "peak_allocated_gib", "peak_reserved_gib", "mfu_h100", "mfu_measured_peak", "final_loss",
              "loss_last5", "heldout_loss")


def add_ratios(results: dict) -> None:
    base = results.get("baseline")
    if not base:
        return
    for r in results.values():
        r["vs_baseline"] = {k: round(r[k] / base[k], 3) for k in RATIO_KEYS if r.get(k) and base.get(k)}


def print_table(results: dict) -> None:
    cols = ["tokens_per_s", "peak_allocated_gib", "peak_reserved_gib", "mfu_h100", "mfu_measured_peak", "final_loss",
            "heldout_loss"]
    width = max([12, *map(len, results)])
    print("\n" + " | ".join(["run".ljust(width)] + [c[:18].rjust(18) for c in cols]))
    for name, r in results.items():
        cells = []
        for c in cols:
            v, ratio = r.get(c), r.get("vs_baseline", {}).get(c)
            cells.append(("-" if v is None else f"{v:.4g}" + (f" ({ratio:.2f}x)" if ratio is not None else "")).rjust(18))
        print(" | ".join([name.ljust(width)] + cells))


def plot_curves(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        curve = r["loss_curve"]
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=name, marker=".", linewidth=1)
    ax.set_xlabel("optimiser step (16 examples each, same examples in every run)")
    ax.set_ylabel("training loss (mean over summary tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one_run:
        return one_run_main(args)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if run_function(r) is None]
    if unknown or not runs:
        problem = f"unknown run(s) {', '.join(unknown)}" if unknown else "no run named in --runs"
        raise SystemExit(f"{problem}; known: {', '.join(RUNS)}")
    device, steps, tokenizer, dataset, heldout = prepare(args)
    lengths = [len(x) for x in dataset["input_ids"]]
    print(f"{len(dataset)} examples, {sum(lengths)} non-pad tokens, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-model-"))
    if args.model:
        model_dir, params = real_model(args.model, args.tokenizer)
        shape = "real weights: " + args.model
    else:
        shape_name = "tiny" if args.small else args.shape
        model_dir = workdir
        params = build_random_model(workdir, SHAPES[shape_name], tokenizer, device)
        shape = f"random weights, {SHAPE_TITLES[shape_name]} shape"
    peak = matmul_peak(device)
    card = device_name(device)
    print(f"{shape}: {params:,} parameters; measured matmul peak {peak / 1e12:.1f} TFLOP/s on {card}")
    print(f"card: {card}. Every ratio below is to the baseline run of this invocation, on this card and host: "
          "speeds move between starts of a machine, so compare ratios only within one call.", flush=True)
    report = {
        "device": card,
        "ratios": "each vs_baseline ratio is to the baseline run of this invocation (same card, same host, same call)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "model": shape, "params": params, "steps": steps, "examples_per_step": EXAMPLES_PER_STEP,
        "examples": len(dataset), "non_pad_tokens": sum(lengths),
        "heldout_examples": len(heldout), "learning": dict(LEARNING),
        "padding_fraction_batch4_dataset_order": padding_fraction(lengths, 4),
        "matmul_peak_tflops": round(peak / 1e12, 1), "h100_peak_tflops": H100_BF16_PEAK / 1e12,
        "timing": f"tokens/s over steps {TIMING_WARMUP_STEPS + 1}..{steps - PROFILED_STEPS} of {steps} "
                  "(GPU synchronised at each step end; the last steps are profiled)",
    }
    try:
        report["packing_check"] = packing_self_check(model_dir, tokenizer, dataset, device)
    except Exception as e:
        import traceback

        traceback.print_exc()
        report["packing_check"] = {"error": f"{type(e).__name__}: {e}"}
    print("packing check:", report["packing_check"])
    results, profiles, errors = {}, {}, {}
    for name in runs:
        if args.in_process:
            outcome = run_one(name, model_dir, tokenizer, dataset, heldout, steps, device, params, peak, args.profile)
        else:
            outcome = run_isolated(name, model_dir, params, peak, argv if argv is not None else sys.argv[1:])
        if "error" in outcome:
            errors[name] = outcome["error"]
            print(f"{name}: failed: {outcome['error']}", flush=True)
        else:
            results[name] = r = outcome["result"]
            if outcome.get("profile"):
                profiles[name] = outcome["profile"]
            print(f"{name}: {r['tokens_per_s']:.0f} tok/s, loss {r['final_loss']}, "
                  f"peak {r.get('peak_allocated_gib')} GiB, checkpointing {r['gradient_checkpointing']}", flush=True)
        # Written after every run, failed ones included: a later run that stops the script (the call's time limit) keeps these.
        out = write_report(args.out, report, results, errors, profiles)
        write_profiles(args.profile_out, profiles)
    if args.plot:
        plot_curves(results, args.plot, f"{shape}, {report['device']}")
    print(f"\n{shape}, {steps} steps of {EXAMPLES_PER_STEP} examples, on {card}; ratios to this call's baseline")
    print_table(results)
    print(f"\nwrote {out}")
    return report


def run_one(name, model_dir, tokenizer, dataset, heldout, steps, device, params, peak, profile) -> dict:
    """Train one run and summarise it: ``{"result", "profile"}``, or ``{"error"}`` if it raised."""
    timer = step_timer(device)
    callbacks = [timer]
    sink: list = []
    if profile and name != "baseline" and steps > TIMING_WARMUP_STEPS + PROFILED_STEPS:
        callbacks.append(step_profiler(device, steps - PROFILED_STEPS, PROFILED_STEPS, sink))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    try:
        state, info, model = run_function(name)(model_dir=model_dir, tokenizer=tokenizer, dataset=dataset, steps=steps,
                                        device=device, seed=42, callbacks=callbacks)
    except Exception as e:  # one broken run must not cost the others (a GPU call is scarce)
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    wall = time.perf_counter() - start
    if device == "cuda":
        info["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        info["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    info["heldout_loss"] = round(heldout_loss(model, tokenizer, heldout, device), 4)
    return {"result": summarise(name, state, info, timer, device, params, peak, wall), "profile": sink[0] if sink else None}


def run_isolated(name: str, model_dir, params: int, peak: float, argv: list[str]) -> dict:
    """``run_one`` in a fresh Python process (this script again, with --one-run). Seen on an H200 on
    2026-12-04 when the runs shared one process: a segfault in one run took the later ones with it,
    and a run's peak memory included what earlier runs had left allocated (memory-lean QLoRA 8.75 GiB
    after four runs, 6.79 GiB on its own)."""
    import signal
    import subprocess

    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "outcome.json"
        command = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), *argv,
                   "--one-run", name, str(model_dir), str(params), repr(peak), "--one-run-out", str(out)]
        code = subprocess.run(command).returncode
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
    if code < 0:
        return {"error": f"the run's process died of {signal.Signals(-code).name} (its stack is in the log above)"}
    return {"error": f"the run's process exited with status {code} before writing a result"}


def one_run_main(args) -> None:
    """The child side of run_isolated: the same data, the model the parent prepared, one run."""
    name, model_dir, params, peak = args.one_run
    device, steps, tokenizer, dataset, heldout = prepare(args)
    outcome = run_one(name, model_dir, tokenizer, dataset, heldout, steps, device, int(params), float(peak), args.profile)
    Path(args.one_run_out).write_text(json.dumps(outcome), encoding="utf-8")


def prepare(args):
    """What every run shares, the same in the parent and in each run's process: (device, steps, tokenizer,
    training examples, held-out examples); sets the learning rate of every run."""
    device = "cpu" if args.small else args.device
    steps = args.steps or (8 if args.small else 30)
    LEARNING["learning_rate"] = args.learning_rate
    tokenizer = load_tokenizer(args.tokenizer)
    data = args.data
    if args.small and not Path(data).is_file():
        from peftbench_plugins.datasets import BUNDLED

        data = str(BUNDLED / "train.jsonl")
    both = load_examples(data, tokenizer, steps * EXAMPLES_PER_STEP + args.heldout)
    dataset = both.select(range(steps * EXAMPLES_PER_STEP))
    return device, steps, tokenizer, dataset, both.select(range(steps * EXAMPLES_PER_STEP, len(both)))


def write_profiles(path: str | None, profiles: dict) -> None:
    if path and profiles:
        Path(path).write_text("\n\n".join(f"== {k}: wall {v['wall_s']} s for {v['steps']} steps, device busy "
                                          f"{v['device_busy_fraction']}\n{v['table']}" for k, v in profiles.items()))


def write_report(path: str, report: dict, results: dict, errors: dict, profiles: dict) -> Path:
    add_ratios(results)
    report["same_tokens_in_every_run"] = len({r["tokens"] for r in results.values()}) == 1
    report["runs"] = results
    report["errors"] = errors
    report["profiles"] = {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in profiles.items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return out


def padding_fraction(lengths: list[int], batch: int) -> float:
    """Share of padding when consecutive groups of ``batch`` are padded to their longest."""
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return round(1 - sum(lengths) / padded, 3)


if __name__ == "__main__":
    main()
