"""Where a training step's host time goes, from a py-spy raw profile of bench_train.py.

  py-spy record -r 200 -f raw -o spy.txt -- python benchmarks/bench_train.py --runs lora_compiled ...
  python benchmarks/diagnostics/spy_summary.py spy.txt [--top 40]

Keeps the samples taken inside the Trainer's loop, leaves out the ones spent compiling (dynamo and
inductor frames), and prints each frame's share of what is left (inclusive: a frame counts every
sample it is on the stack of). Samples of autograd's backward thread are counted apart: py-spy
samples every thread that is running, so a step's host time is the loop's plus the backward's.
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter

# Frames only seen while compiling. Not all of torch/_inductor: its runtime/ and output_code launch the compiled
# kernels at every step, and that is host time the summary must keep.
COMPILING = ("torch/_dynamo/convert_frame", "symbolic_convert", "compile_fx", "torch/_inductor/codecache",
             "torch/_inductor/async_compile", "torch/_inductor/graph.py", "torch/_inductor/scheduler",
             "torch/_functorch/_aot_autograd/graph_compile")


def frame_name(frame: str) -> str:
    """'Trainer.train (transformers/trainer.py:1520)' -> 'Trainer.train trainer.py:1520'."""
    name, _, where = frame.partition(" (")
    return f"{name} {where.rstrip(')').rsplit('/', 1)[-1]}".strip()


def summarise(lines, top: int) -> str:
    loop, backward, compiling, inclusive = 0, 0, 0, Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        if any(marker in stack for marker in COMPILING):
            compiling += n
        elif "_inner_training_loop" in stack:
            loop += n
            for name in dict.fromkeys(frame_name(f) for f in stack.split(";")):
                inclusive[name] += n
        elif "CompiledFunction.backward" in stack or "BackwardCFunction" in stack:
            backward += n
    out = [f"samples: {loop} in the training loop, {backward} in compiled backward (autograd's thread), "
           f"{compiling} compiling (left out)", "share of the loop's samples, inclusive:"]
    out += [f"{100 * n / max(loop, 1):5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", help="py-spy raw output (.txt or .txt.gz)")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    opener = gzip.open if args.raw.endswith(".gz") else open
    with opener(args.raw, "rt", encoding="utf-8") as f:
        print(summarise(f, args.top))


if __name__ == "__main__":
    main()
