#!/usr/bin/env python3
"""Data-parallel speed-up: recipes/qlora_samsum.yaml on one GPU, then on two GPUs through
`accelerate launch`, comparing non-pad tokens per second and training loss.

Three runs over the same training examples in the same order:
  1gpu         1 process,   4 x grad_accum 4 = 16 examples per step, STEPS steps
  2gpu-recipe  2 processes, 4 x grad_accum 4 per GPU = 32 per step, STEPS/2 steps: the recipe as it
               is (its batch is per GPU), so each GPU does what the single GPU did
  2gpu-batch   2 processes, 4 x grad_accum 2 per GPU = 16 per step, STEPS steps: the same global
               batch, so the optimisation is 1gpu's step for step and the losses should match
Tokens per second is the run record's figure (non-pad tokens of all processes / training time).
Loss is compared as the mean per-step loss over the last fifth of the examples, which all runs see.

    python3 benchmarks/bench_multigpu.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data SAMSUM_DIR --out DIR
    python3 benchmarks/bench_multigpu.py ... --random-1b   # a random Llama-3.2-1B-shaped model instead

Self-contained for a machine without network where peftbench is a checkout, not an installed
package: see benchmarks/README-multigpu.md. Without GPUs it runs on the CPU (a plumbing check only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qlora_samsum.yaml"
BATCH = 4
# Llama-3.2-1B's shape (its vocabulary aside: the model keeps the GGUF tokenizer and chat template).
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True)
# This workplace's multi-GPU hosts: NVLink multicast stays off (it can take the shared GPUs down).
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def python_env(out: Path) -> dict[str, str]:
    """The environment every run gets: peftbench importable from this checkout, NCCL kept safe."""
    env = {**os.environ, **NCCL_SAFETY, "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO)]  # peftbench and peftbench_plugins are both folders of the checkout
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def build_random_1b(gguf: Path, directory: Path) -> Path:
    """A randomly initialised Llama-3.2-1B-shaped model with the GGUF's tokenizer, saved in bf16:
    throughput needs the shape, not trained weights."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # transformers < 5.23 builds SmolLM2's tokenizer without one
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LLAMA_1B_SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising on the GPU takes seconds
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()  # the runs need the memory, not this process
    return directory


def peftbench_command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "peftbench"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0", "-m", "peftbench"]


def run(name: str, processes: int, grad_accum: int, steps: int, common: list[str], out: Path, env: dict) -> dict:
    run_dir = out / name
    command = peftbench_command(processes) + ["run", str(RECIPE), *common, f"trainer.grad_accum={grad_accum}",
                                              f"trainer.max_steps={steps}", "--output-dir", str(run_dir), "--overwrite"]
    run_env = dict(env)
    if processes == 1 and "CUDA_VISIBLE_DEVICES" not in env:
        run_env["CUDA_VISIBLE_DEVICES"] = "0"
    log = out / f"{name}.log"
    print(f"[{name}] {processes} process(es), batch {BATCH} x grad_accum {grad_accum} per process, {steps} steps; log: {log}",
          flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=run_env, cwd=REPO)
    if code != 0:
        print(f"[{name}] FAILED (exit {code}); the end of its log:\n" + "".join(log.read_text().splitlines(True)[-40:]))
        raise SystemExit(1)
    record = json.loads((run_dir / "run.json").read_text())
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return record


def tail_loss(record: dict, fraction: float = 0.2) -> tuple[float, float]:
    """Mean and standard error of the per-step losses over the last ``fraction`` of the steps."""
    losses = [m["loss"] for m in record["train_info"]["metrics"] if "loss" in m]
    tail = losses[-max(1, round(len(losses) * fraction)):]
    return statistics.fmean(tail), statistics.stdev(tail) / len(tail) ** 0.5 if len(tail) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct GGUF (the model, or with --random-1b its tokenizer)")
    parser.add_argument("--data", type=Path, required=True, help="folder with SAMSum train.jsonl and validation.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-multigpu", help="where runs, logs and the summary go")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of the 16-example runs (2gpu-recipe does half)")
    parser.add_argument("--random-1b", action="store_true", help="train a random Llama-3.2-1B-shaped model (throughput only)")
    parser.add_argument("--eval-samples", type=int, default=16, help="validation dialogues summarised after training")
    parser.add_argument("--runs", default="1gpu,2gpu-recipe,2gpu-batch", help="which runs, comma-separated")
    args = parser.parse_args()
    if args.steps % 2:
        parser.error("--steps must be even (2gpu-recipe runs half of them)")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = python_env(out)
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p not in sys.path]
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"warning: {gpus} GPU(s) visible: the runs go to {'the CPU' if gpus == 0 else 'too few GPUs'} "
              "and check the plumbing only; their figures mean nothing", flush=True)
    if args.random_1b:  # kept beside peftbench's dequantised GGUFs, not under --out, which may be copied back
        from peftbench.pipeline.modeling import cache_root

        model = str(build_random_1b(args.gguf.resolve(), cache_root() / "models" / "random-llama-3.2-1b-shape"))
    else:
        model = str(args.gguf.resolve())
    examples = args.steps * 16
    common = [
        f"model.name={model}", f"dataset.path={args.data.resolve()}",
        f"dataset.max_samples={{train: {examples}, validation: 64}}",
        "evaluation.split=validation", "evaluation.baseline=false", f"evaluation.max_samples={args.eval_samples}",
        f"trainer.batch_size={BATCH}", "trainer.logging_steps=1", "trainer.eval_steps=null", "trainer.save_steps=100000",
    ]
    plan = {"1gpu": (1, 4, args.steps), "2gpu-recipe": (2, 4, args.steps // 2), "2gpu-batch": (2, 2, args.steps)}
    wanted = [name for name in args.runs.split(",") if name]
    unknown = set(wanted) - set(plan)
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}; choose from {', '.join(plan)}")
    records = {name: run(name, *plan[name], common, out, env) for name in wanted}

    rows, summary = [], {"model": "random Llama-3.2-1B shape" if args.random_1b else args.gguf.name,
                         "device": torch.cuda.get_device_name(0) if gpus else "cpu", "runs": {}}
    base = records.get("1gpu")
    for name, record in records.items():
        train = record["train_info"]
        mean, se = tail_loss(record)
        speedup = train["tokens_per_second"] / base["train_info"]["tokens_per_second"] if base else None
        summary["runs"][name] = {
            "num_processes": train["num_processes"], "global_batch_size": train["global_batch_size"], "steps": train["steps"],
            "train_time_s": train["train_time"], "tokens_seen": train["tokens_seen"],
            "tokens_per_second": train["tokens_per_second"], "speedup_vs_1gpu": speedup,
            "final_loss": train["final_loss"], "tail_loss_mean": mean, "tail_loss_stderr": se,
        }
        rows.append(f"| {name} | {train['num_processes']} | {train['global_batch_size']} | {train['steps']} | "
                    f"{train['train_time']:.1f} | {train['tokens_seen']:,} | {train['tokens_per_second']:,.0f} | "
                    f"{f'{speedup:.2f}x' if speedup else 'n/a'} | {train['final_loss']:.4f} | {mean:.4f} ± {se:.4f} |")
    table = "\n".join([
        f"Data-parallel QLoRA ({summary['model']}) on {summary['device']}",
        "",
        "| run | GPUs | global batch | steps | train s | non-pad tokens | tokens/s | speed-up | final loss | tail loss ± s.e. |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    print("\n" + table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten: {out / 'summary.md'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
