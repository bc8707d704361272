"""``peftbench smoke MODEL.gguf``: the smoke test from the command line, with a table of its scores."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peftbench.api import CommandPlugin, PeftbenchError
from peftbench.kit import console, load_examples, prompt_settings, read_predictions
from peftbench_plugins.gguf.answering import SMOKE_PARALLEL
from peftbench_plugins.gguf.gguf_file import require_gguf_file
from peftbench_plugins.gguf.ollama import ollama_live_check, user_message
from peftbench_plugins.gguf.smoke import SmokeResult, smoke_test, write_answers

EXIT_FAILED = 1
DEFAULT_DATASET = "chatsum"  # without --data: the bundled set
FILE_DATASET = "samsum"  # with --data: a dataset file or folder in SAMSum's layout


class SmokeCommand(CommandPlugin):
    name = "smoke"
    help = "check an exported GGUF with llama.cpp: loads, stops at end-of-turn, still summarises"
    description = ("Summarise N dialogues with a GGUF through llama.cpp, using the chat template inside the file; check "
                   "each answer (non-empty, ended at end-of-turn, no template tokens), report ROUGE and agreement with the "
                   "HF model, run the Modelfile beside it in Ollama when `ollama` is on PATH. Exits 1 when a check fails.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("gguf", metavar="MODEL.gguf")
        parser.add_argument("--data", help="dataset file or folder (test split, else validation); default: the bundled chatsum set")
        parser.add_argument("--dataset", metavar="NAME",
                            help=f"dataset plugin that reads the examples (default: {FILE_DATASET} with --data, else {DEFAULT_DATASET})")
        parser.add_argument("-n", type=int, metavar="N", help="examples to summarise (default: the whole split)")
        parser.add_argument("--hf-predictions", metavar="FILE",
                            help="the run's predictions_finetuned.jsonl: agreement with the HF model and the ROUGE-1 margin check")
        parser.add_argument("--margin", type=float, default=1.5,
                            help="fail when the GGUF's ROUGE-1 is more than this many points below the HF model's (default 1.5)")
        parser.add_argument("--recipe", metavar="RECIPE_OR_RUN_DIR",
                            help="take the prompt and max_new_tokens from this recipe or run directory (default: recipe defaults)")
        parser.add_argument("-o", "--output", metavar="FILE", help="write the answers and per-answer checks as JSON Lines")
        parser.add_argument("--workers", type=int, metavar="W",
                            help="llama.cpp processes answering side by side (default: one per core, within half the free memory)")
        parser.add_argument("--parallel", type=int, default=SMOKE_PARALLEL, metavar="P",
                            help="sequences each worker decodes in one llama.cpp batch (default 1, one at a time: "
                                 "batched answers can differ from one-at-a-time ones)")

    def run(self, args) -> int:
        """0 when every check passes, 1 when one fails (each failure printed)."""
        require_gguf_file(args.gguf)  # before the data loads and the progress bar starts
        if args.parallel < 1:
            raise PeftbenchError(f"--parallel {args.parallel} is not a number of sequences.", "pass 1 (one at a time) or more.")
        if args.workers is not None and args.workers < 1:
            raise PeftbenchError(f"--workers {args.workers} is not a number of processes.", "pass 1 or more (default: one per core).")
        prompt, max_new_tokens = prompt_settings(args.recipe)
        dataset = args.dataset or (FILE_DATASET if args.data else DEFAULT_DATASET)
        examples = load_examples(dataset, {"path": args.data} if args.data else {}, args.n)
        hf = read_predictions(args.hf_predictions) if args.hf_predictions else None
        with Progress(TextColumn("[bold]llama.cpp"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("gguf", total=len(examples))
            result = smoke_test(args.gguf, examples, prompt, max_new_tokens=max_new_tokens, hf_predictions=hf,
                                margin=args.margin, parallel=args.parallel, workers=args.workers,
                                progress=lambda k: bar.advance(task, k))
        if args.output:
            write_answers(Path(args.output), result)
        print_result(args.gguf, result)
        modelfile = Path(args.gguf).parent / "Modelfile"
        status, detail = ollama_live_check(modelfile, user_message(prompt, examples[0]["dialogue"]))
        console.print(f"ollama live check {status}: {detail}")
        if status == "failed":
            result.problems.append(f"ollama live check failed: {detail}")
        return print_verdict(result)


def print_result(gguf: str, result: SmokeResult) -> None:
    """The scores table, the change against the HF model, llama.cpp's speed and the answers' checks."""
    table = Table(title=f"{Path(gguf).name} on {len(result.answers)} examples ({result.seconds:.1f} s)")
    for col in ("", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [("GGUF vs references", result.scores)]
    if result.hf_scores is not None:
        rows += [("HF vs references", result.hf_scores), ("GGUF vs HF (agreement)", result.agreement)]
    for label, scores in rows:
        table.add_row(label, *(f"{scores[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    console.print(table)
    if result.change is not None:
        console.print(f"ROUGE-1 change against the HF model: {result.change['change']:+.2f} "
                      f"± {result.change['standard_error']:.2f} (paired standard error over {result.change['n']} examples)")
    g = result.generation
    console.print(f"llama.cpp: {g['generated_tokens']} tokens generated in {g['decode_s']} s ({g['tokens_per_second']} tokens/s), "
                  f"{g['workers']} worker(s) x {g['threads']} thread(s), {g['parallel']} sequence(s) at once in each")
    ended = sum(a.ended_at_eot for a in result.answers)
    console.print(f"{ended} of {len(result.answers)} answers ended at end-of-turn; "
                  f"{sum(not a.text for a in result.answers)} empty; "
                  f"leaked template tokens: {', '.join(sorted({m for a in result.answers for m in a.leaked})) or 'none'}")


def print_verdict(result: SmokeResult) -> int:
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.passed:
        console.print("[green]smoke test passed[/]")
        return 0
    for problem in result.problems:
        console.print(f"[red]failed:[/] {problem}")
    return EXIT_FAILED
