"""The smoke test's ways of using the CPU against one answer at a time in one process, in the same run.

    python benchmarks/bench_smoke.py MODEL.gguf --data /path/to/samsum --split validation -n 64 \
        --setups 1x1 2x1 1x8 [--recipe RUN_DIR] [--full 2x1]

A setup WxP is W worker processes side by side (``peftbench_plugins.gguf.smoke.answer_in_workers``, cores // W
llama.cpp threads each), each decoding P sequences in one llama.cpp batch (1 = ``llm.generate``, one at
a time; more = ``peftbench_plugins.gguf.answering.BatchedAnswers``). The first setup is the baseline. For each it prints
time, generated tokens/s, the speed-up over the baseline, how many answers are token-for-token identical
to the baseline's, and ROUGE-1 against the references and against the baseline's answers (agreement).
``--full WxP`` then answers the whole split that way and prints its time. Timings are wall clock on
whatever else the machine is doing: compare ratios.
"""

from __future__ import annotations

import argparse
import time

from peftbench.pipeline.evaluation import rouge
from peftbench.kit import load_examples, prompt_settings
from peftbench_plugins.gguf.llama import cpu_threads
from peftbench_plugins.gguf.smoke import answer_in_workers


def setup(text: str) -> tuple[int, int]:
    workers, _, parallel = text.partition("x")
    return int(workers), int(parallel or 1)


def answer(gguf, examples, prompt, max_new_tokens, workers_parallel):
    workers, parallel = workers_parallel
    start = time.perf_counter()
    out = answer_in_workers(gguf, examples, prompt, max_new_tokens, parallel=parallel, workers=workers)
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--data", help="dataset path (default: the bundled chatsum)")
    parser.add_argument("--split", default="test")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--setups", type=setup, nargs="+", default=[(1, 1), (cpu_threads(), 1)], metavar="WxP",
                        help=f"worker processes x sequences per batch (default 1x1 {cpu_threads()}x1)")
    parser.add_argument("--recipe", help="recipe or run directory for the prompt settings (default: recipe defaults)")
    parser.add_argument("--full", type=setup, metavar="WxP", help="then answer the whole split with this setup")
    args = parser.parse_args()

    prompt, max_new_tokens = prompt_settings(args.recipe)
    examples = load_examples(args.data, args.n, args.split)
    references = [ex["summary"] for ex in examples]
    first = None
    print(f"{args.gguf}: first {len(examples)} dialogues of {args.split}, max_new_tokens {max_new_tokens}")
    for workers_parallel in args.setups:
        out = answer(args.gguf, examples, prompt, max_new_tokens, workers_parallel)
        texts = [a.text for a in out["answers"]]
        tokens = [a for a in out["answers"]]
        line = (f"{out['workers']} worker(s) x {out['threads']} thread(s), {out['parallel']} at once: {out['wall_s']:.1f} s wall, decode {out['decode_s']:.1f} s, "
                f"{out['generated_tokens'] / out['decode_s']:.1f} generated tokens/s, "
                f"ROUGE-1 {rouge(texts, references)['rouge1']:.2f}")
        if "prompt_s" in out:
            line += (f" [prompts {out['prompt_s']:.1f} s, {out['prompt_tokens'] / max(out['prompt_s'], 1e-9):.0f} tok/s; "
                     f"{out['steps']} decoding steps {out['step_s']:.1f} s, {out['step_tokens'] / max(out['step_s'], 1e-9):.0f} tok/s]")
        if first is None:
            first = out
        else:
            same = sum(a.text == b.text and a.tokens == b.tokens for a, b in zip(first["answers"], tokens))
            agreement = rouge(texts, [a.text for a in first["answers"]])["rouge1"]
            line += (f"; {first['decode_s'] / out['decode_s']:.2f}x the first setup's speed, "
                     f"{same} of {len(texts)} answers identical, agreement ROUGE-1 {agreement:.2f}")
        print(line, flush=True)
    if args.full:
        everything = load_examples(args.data, None, args.split)
        out = answer(args.gguf, everything, prompt, max_new_tokens, args.full)
        texts = [a.text for a in out["answers"]]
        print(f"all {len(everything)} dialogues, {args.full[0]}x{args.full[1]}: {out['wall_s']:.1f} s wall ({out['wall_s'] / 60:.1f} min), "
              f"{out['generated_tokens'] / out['decode_s']:.1f} generated tokens/s, "
              f"ROUGE-1 {rouge(texts, [ex['summary'] for ex in everything])['rouge1']:.2f}", flush=True)


if __name__ == "__main__":
    main()
