"""Which 16-bit weights should the adapter of a 4-bit method be merged into?

A QLoRA adapter (or IA3 on a 4-bit base) is trained against the base's NF4 weights, dequantised. Merging
folds it into 16-bit weights, which can be the original base (``merge_into: original``) or the NF4
weights dequantised (``nf4_roundtrip``). This script scores, on a finished run's own evaluation examples,
the merged model for each target: ROUGE against the references and ROUGE-1 agreement with the run's
unmerged answers (predictions_finetuned.jsonl), with the same batched greedy decoding.

    python benchmarks/diagnostics/merge_target.py runs/compare_samsum/qlora-learning_rate0.0006-seed1 [--n 818]

Prints one JSON line per target and writes them to RUN_DIR/merge_target.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=None, help="first N evaluation examples (default: all the run scored)")
    parser.add_argument("--targets", nargs="+", default=["original", "nf4_roundtrip"])
    args = parser.parse_args(argv)

    from peftbench.pipeline.context import RunContext
    from peftbench.pipeline.evaluation import generate_summaries, rouge
    from peftbench.pipeline.export_run import what_the_export_reads
    from peftbench.pipeline.recipe import load_recipe
    from peftbench.kit import read_predictions

    recipe = load_recipe(args.run_dir / "recipe.yaml")
    r = recipe.recipe
    # The base model, tokenizer and evaluation rows as `peftbench export` finds them (same rows as the run).
    policy, source, tokenizer, examples = what_the_export_reads(recipe, args.run_dir)
    unmerged_of = read_predictions(args.run_dir / "predictions_finetuned.jsonl")
    rows = list(examples)[: args.n] if args.n else list(examples)
    dialogues, references = [row["dialogue"] for row in rows], [row["summary"] for row in rows]
    unmerged = [unmerged_of[str(row["id"])] for row in rows]
    ctx = RunContext(recipe=recipe, run_dir=args.run_dir, policy=policy, model_source=source, tokenizer=tokenizer)
    results = [{"target": "unmerged (the run's answers)", **rouge(unmerged, references)}]
    print(json.dumps(results[0]), flush=True)
    for target in args.targets:
        if "merge_into" not in type(recipe.method_options).model_fields:
            print(f"{recipe.method.name} has no merge_into option", file=sys.stderr)
            return 2
        options = recipe.method_options.model_copy(update={"merge_into": target})
        start = time.perf_counter()
        merged = recipe.method.merge(None, options, ctx).to(policy.device)
        answers = generate_summaries(merged, ctx.tokenizer, r.prompt, dialogues, batch_size=r.evaluation.batch_size,
                                     max_new_tokens=r.evaluation.max_new_tokens, num_beams=r.evaluation.num_beams)
        result = {"target": target, **rouge(answers, references),
                  "agreement_rouge1_with_unmerged": rouge(answers, unmerged)["rouge1"],
                  "identical_answers": sum(a == b for a, b in zip(answers, unmerged)),
                  "dtype": str(next(merged.parameters()).dtype), "seconds": round(time.perf_counter() - start, 1)}
        results.append(result)
        print(json.dumps(result), flush=True)
        del merged
    (args.run_dir / "merge_target.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
