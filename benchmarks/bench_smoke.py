"""The smoke test's batched llama.cpp decoding against one answer at a time, in the same run.

    python benchmarks/bench_smoke.py MODEL.gguf --data /path/to/samsum --split validation -n 64 \
        --parallel 1 8 [--recipe RUN_DIR] [--full 8]

Answers the first N dialogues with each ``--parallel`` value (1 = ``llm.generate``, one at a time;
more = ``peftbench.smoke.answer_batched``), each in its own child process as peftbench runs it, and
prints time, generated tokens/s, the speed-up over the first value, how many answers are token-for-token
identical to the first value's, and ROUGE-1 of each against the references and against the first
value's answers (agreement). ``--full P`` then answers the whole split with P sequences at once and
prints its time. Timings are wall clock on whatever else the machine is doing: compare ratios.
"""

from __future__ import annotations

import argparse
import time

from peftbench.isolation import run_isolated
from peftbench.pipeline.evaluation import rouge
from peftbench.smoke import LLAMA_CRASH_FIX, answer_examples, load_examples, prompt_settings


def answer(gguf, examples, prompt, max_new_tokens, parallel):
    start = time.perf_counter()
    out = run_isolated(answer_examples, gguf, examples, prompt, max_new_tokens, parallel, what="llama.cpp", fix=LLAMA_CRASH_FIX)
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--data", help="dataset path (default: the bundled chatsum)")
    parser.add_argument("--split", default="test")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--recipe", help="recipe or run directory for the prompt settings (default: recipe defaults)")
    parser.add_argument("--full", type=int, metavar="P", help="then answer the whole split with P sequences at once")
    args = parser.parse_args()

    prompt, max_new_tokens = prompt_settings(args.recipe)
    examples = load_examples(args.data, args.n, args.split)
    references = [ex["summary"] for ex in examples]
    first = None
    print(f"{args.gguf}: first {len(examples)} dialogues of {args.split}, max_new_tokens {max_new_tokens}")
    for parallel in args.parallel:
        out = answer(args.gguf, examples, prompt, max_new_tokens, parallel)
        texts = [a.text for a in out["answers"]]
        tokens = [a for a in out["answers"]]
        line = (f"parallel {parallel:>2}, {out['threads']} threads: {out['wall_s']:.1f} s wall, decode {out['decode_s']:.1f} s, "
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
            line += (f"; {first['decode_s'] / out['decode_s']:.2f}x parallel {first['parallel']}'s speed, "
                     f"{same} of {len(texts)} answers identical, agreement ROUGE-1 {agreement:.2f}")
        print(line, flush=True)
    if args.full:
        everything = load_examples(args.data, None, args.split)
        out = answer(args.gguf, everything, prompt, max_new_tokens, args.full)
        texts = [a.text for a in out["answers"]]
        print(f"all {len(everything)} dialogues, parallel {args.full}: {out['wall_s']:.1f} s wall ({out['wall_s'] / 60:.1f} min), "
              f"{out['generated_tokens'] / out['decode_s']:.1f} generated tokens/s, "
              f"ROUGE-1 {rouge(texts, [ex['summary'] for ex in everything])['rouge1']:.2f}", flush=True)


if __name__ == "__main__":
    main()
