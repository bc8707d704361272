"""Evaluation speed: summarising dialogues one at a time (the lesson's way) against peftbench's
batched path (peftbench.pipeline.evaluation.generate_summaries), same model, greedy decoding, 64 new tokens.

  python benchmarks/bench_eval.py --device cuda --data .cache/bench/samsum/eval.jsonl \\
      --tokenizer .cache/bench/tokenizer --out benchmarks/results/bench_eval.json
  python benchmarks/bench_eval.py --small          # the CPU, a tiny shape, to check the script

The one-at-a-time path is timed on the first --single-n dialogues and its time for all of them is
extrapolated from the mean (819 dialogues one at a time would take about a quarter of an hour);
the batched path runs all of them. With random weights no summary stops early, so both paths
generate the full 64 tokens for every dialogue: the worst case for both. Outputs are compared on
--check-n dialogues in float32, where batching cannot flip a greedy choice through rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import LLAMA_1B, TINY, load_tokenizer, summarise_profile, sync  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--data", default=".cache/bench/samsum/eval.jsonl")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--n", type=int, default=819, help="dialogues to summarise (SAMSum's test split has 819)")
    p.add_argument("--single-n", type=int, default=16, help="dialogues timed one at a time")
    p.add_argument("--check-n", type=int, default=8, help="dialogues whose outputs are compared (float32)")
    p.add_argument("--check-model", default=None, help="real weights (directory or .gguf) for the output comparison; "
                   "default: the random model, whose greedy outputs mostly repeat one token")
    p.add_argument("--model", default=None, help="time real weights (directory or .gguf) instead of the random 1B shape")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes for the batched path "
                   "(default: the recipe's evaluation.batch_size default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-implementation", default=None, help="transformers' KV cache for the batched path "
                   "(default: its dynamic cache; e.g. static)")
    p.add_argument("--profile-out", default=None, help="torch.profiler over one more batched pass of the first batch size: "
                   "device-busy fraction and the top kernels, to this text file")
    p.add_argument("--out", default="benchmarks/results/bench_eval.json")
    return p.parse_args(argv)


def load_dialogues(path: str, n: int, with_summaries: bool = False) -> list:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["dialogue"].strip():
                out.append((row["dialogue"], row.get("summary", "")) if with_summaries else row["dialogue"])
            if len(out) == n:
                break
    return out


@torch.no_grad()
def summarise_one_at_a_time(model, tokenizer, prompt, dialogues, max_new_tokens) -> list[str]:
    """The lesson's loop: one prompt, one generate call, one decode."""
    from peftbench.pipeline.chat import encode_prompt, stop_token_ids

    device = next(model.parameters()).device
    out = []
    for dialogue in dialogues:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, dialogue)], device=device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                   pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftbench.pipeline.evaluation import generate_summaries
    from peftbench.pipeline.recipe import EvaluationSection, PromptSection

    args = parse_args(argv)
    device = "cpu" if args.small else args.device
    tokenizer = load_tokenizer(args.tokenizer)
    data = args.data
    if args.small and not Path(data).is_file():
        from peftbench_plugins.datasets import BUNDLED

        data = str(BUNDLED / "test.jsonl")
    n = min(args.n, 24) if args.small else args.n
    rows = load_dialogues(data, n, with_summaries=True)
    dialogues, references = [d for d, _ in rows], [r for _, r in rows]
    prompt = PromptSection(max_source_tokens=448)
    default_batch = EvaluationSection().batch_size
    batch_sizes = [b if b == "auto" else int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [default_batch]
    if args.model:
        from transformers import AutoModelForCausalLM

        from peftbench.pipeline.modeling import load_tokenizer as load_model_tokenizer, resolve_model_source

        source = resolve_model_source(args.model)
        tokenizer = load_model_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model = model.to(device).eval()
        what = f"{args.model}, real weights"
    else:
        shape = TINY if args.small else LLAMA_1B
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
            # Rows past the tokenizer's vocabulary (SmolLM2's 49k of Llama's 128k) get zero embeddings,
            # hence zero logits, so greedy decoding picks only tokens the tokenizer can decode.
            model.get_input_embeddings().weight.data[len(tokenizer):] = 0
        what = f"{'tiny' if args.small else 'Llama-3.2-1B'} shape, random weights"
    print(f"{len(dialogues)} dialogues; model {what}, {model.dtype}, attention {model.config._attn_implementation}, "
          f"on {device}", flush=True)
    new = args.max_new_tokens
    single_n = min(args.single_n, len(dialogues))

    summarise_one_at_a_time(model, tokenizer, prompt, dialogues[:1], new)  # warm-up
    _, single_s = timed(lambda: summarise_one_at_a_time(model, tokenizer, prompt, dialogues[:single_n], new), device)
    per_dialogue = single_s / single_n
    print(f"one at a time: {single_s:.1f} s for {single_n} -> {per_dialogue * len(dialogues):.0f} s for {len(dialogues)} "
          "(extrapolated)", flush=True)

    batched = {}
    for bs in batch_sizes:
        warm = 16 if bs == "auto" else bs
        cache = {"cache_implementation": args.cache_implementation}
        generate_summaries(model, tokenizer, prompt, dialogues[:warm], batch_size=bs, max_new_tokens=new, **cache)  # warm-up
        outputs, seconds = timed(lambda: generate_summaries(model, tokenizer, prompt, dialogues, batch_size=bs,
                                                            max_new_tokens=new, **cache), device)
        from peftbench.pipeline.evaluation import rouge

        scores, rouge_s = timed(lambda: rouge(outputs, references), "cpu")
        batched[bs] = {"seconds": round(seconds, 2), "rouge_seconds": round(rouge_s, 2), "rouge1": scores["rouge1"],
                       "seconds_with_rouge": round(seconds + rouge_s, 2), "dialogues_per_s": round(len(dialogues) / seconds, 2),
                       "speedup_vs_one_at_a_time": round(per_dialogue * len(dialogues) / seconds, 1),
                       "mean_summary_chars": round(sum(map(len, outputs)) / len(outputs), 1)}
        print(f"batched, batch {bs}: {seconds:.1f} s for {len(dialogues)} ({batched[bs]['speedup_vs_one_at_a_time']}x), "
              f"+ ROUGE {rouge_s:.1f} s (ROUGE-1 {scores['rouge1']:.2f})", flush=True)

    if args.profile_out:
        from torch.profiler import ProfilerActivity, profile

        bs = batch_sizes[0]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        sync(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            generate_summaries(model, tokenizer, prompt, dialogues, batch_size=bs, max_new_tokens=new,
                               cache_implementation=args.cache_implementation)
            sync(device)
        summary = summarise_profile(prof, time.perf_counter() - start, 1, device)
        Path(args.profile_out).write_text(f"== batched generation, batch {bs}, {len(dialogues)} dialogues: wall "
                                          f"{summary['wall_s']} s, device busy {summary['device_busy_fraction']}\n"
                                          f"{summary['table']}\n", encoding="utf-8")
        print(f"profile: wall {summary['wall_s']} s, device busy {summary['device_busy_fraction']} -> {args.profile_out}")

    # Identity: greedy outputs of both paths, in float32 so that rounding cannot flip a near-tie.
    check_n = min(args.check_n, len(dialogues))
    check_what = "the random model"
    if args.check_model and args.check_model != args.model:
        from transformers import AutoModelForCausalLM

        from peftbench.pipeline.modeling import load_tokenizer as load_model_tokenizer, resolve_model_source

        source = resolve_model_source(args.check_model)
        del model
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
        tokenizer = load_model_tokenizer(source)
        check_what = f"real weights ({args.check_model})"
    else:
        model = model.float()
        check_what = what
    single = summarise_one_at_a_time(model, tokenizer, prompt, dialogues[:check_n], new)
    together = generate_summaries(model, tokenizer, prompt, dialogues[:check_n], batch_size=check_n, max_new_tokens=new,
                                  cache_implementation=args.cache_implementation)
    identical = sum(a == b for a, b in zip(single, together))
    print(f"identical outputs ({check_what}, float32, batch {check_n}): {identical}/{check_n}", flush=True)

    best = min(batched, key=lambda b: batched[b]["seconds"])
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": what + ", bf16 on a GPU (float32 for the identity check)",
        "dialogues": len(dialogues), "max_new_tokens": new, "prompt_max_tokens": prompt.max_source_tokens,
        "one_at_a_time": {"timed_dialogues": single_n, "seconds_timed": round(single_s, 2),
                          "seconds_per_dialogue": round(per_dialogue, 3),
                          "seconds_all_extrapolated": round(per_dialogue * len(dialogues), 1)},
        "batched": {str(k): v for k, v in batched.items()},
        "recipe_default_batch_size": default_batch,
        "best_batch_size": best,
        "speedup": batched[best]["speedup_vs_one_at_a_time"],
        "seconds_batched": batched[best]["seconds"],
        "identity_check": {"dialogues": check_n, "identical": identical, "dtype": "float32", "model": check_what,
                           "examples": [{"one_at_a_time": a[:80], "batched": b[:80]} for a, b in zip(single[:2], together[:2])]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("one_at_a_time", "batched", "speedup", "seconds_batched", "identity_check")},
                     indent=1)[:3000])
    return report


if __name__ == "__main__":
    main()
