"""The smoke test of a GGUF through llama.cpp, and its result.

Does the file load; does the chat template embedded in it build the prompts peftbench trained and
evaluated with; does every answer stop at an end-of-turn token by itself, without leaking template
tokens; and does the model still summarise: ROUGE against the references and, given the HF model's
predictions, agreement with them and a margin check on ROUGE-1. llama.cpp answers in child
processes (``answer_in_workers``): a native crash there is one NativeCrash here, never a dead caller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peftbench.api import PeftbenchError
from peftbench.kit import atomic_write_text, console, paired_rouge1_change, read_predictions, rouge, run_isolated_side_by_side
from peftbench_plugins.gguf.answering import BATCH_TIMINGS, SMOKE_PARALLEL, STOP_BUDGET_FACTOR, Answer, answer_examples
from peftbench_plugins.gguf.gguf_file import require_gguf_file
from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX, cpu_threads

# A broken stop token or chat template shows as most answers running on; a few answers that ramble
# are the model's quality, which the ROUGE margin against the HF model judges. Above this share of
# answers, not stopping fails the smoke test; below it, it is reported as a note.
MAX_NOT_STOPPING_SHARE = 0.25


@dataclass
class SmokeResult:
    gguf: str
    answers: list[Answer]
    references: list[str]
    scores: dict  # ROUGE of the GGUF's answers against the references
    seconds: float
    margin: float
    generation: dict = field(default_factory=dict)  # generated_tokens, decode_s, tokens_per_second, parallel, threads
    hf_scores: dict | None = None  # ROUGE of the HF predictions on the same examples
    agreement: dict | None = None  # ROUGE of the GGUF's answers against the HF predictions
    change: dict | None = None  # paired ROUGE-1 change against the HF predictions, with its standard error
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self) -> "SmokeResult":
        n = len(self.answers)
        empty = [a.id for a in self.answers if not a.text]
        no_eot = [a.id for a in self.answers if not a.ended_at_eot]
        leaked = sorted({m for a in self.answers for m in a.leaked})
        if empty:
            self.problems.append(f"{len(empty)} of {n} answers are empty ({_some(empty)})")
        if no_eot:
            message = (f"{len(no_eot)} of {n} answers did not stop at end-of-turn within "
                       f"{STOP_BUDGET_FACTOR}x the token limit ({_some(no_eot)})")
            if len(no_eot) > MAX_NOT_STOPPING_SHARE * n:
                self.problems.append(message)
            else:
                self.notes.append(message + f"; at most {MAX_NOT_STOPPING_SHARE:.0%} may")
        if leaked:
            self.problems.append(f"template tokens leaked into answers: {', '.join(leaked)}")
        if self.hf_scores is not None:
            drop = self.hf_scores["rouge1"] - self.scores["rouge1"]
            if drop > self.margin:
                self.problems.append(f"ROUGE-1 {self.scores['rouge1']:.2f} is {drop:.2f} points below the HF model's "
                                     f"{self.hf_scores['rouge1']:.2f} (allowed: {self.margin})")
        return self

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_record(self) -> dict:
        """eval.gguf in run.json: the ROUGE keys of eval.finetuned plus what only a GGUF has."""
        words = sum(len(a.text.split()) for a in self.answers) / max(len(self.answers), 1)
        return {
            **self.scores, "mean_summary_words": round(words, 2), "eval_time_s": round(self.seconds, 2),
            "file": self.gguf,
            "ended_at_eot": sum(a.ended_at_eot for a in self.answers),
            "empty": sum(not a.text for a in self.answers),
            "leaked": sorted({m for a in self.answers for m in a.leaked}),
            "hf_rouge1_same_examples": self.hf_scores["rouge1"] if self.hf_scores else None,
            "agreement_with_hf": self.agreement,
            "change_vs_hf": self.change,
            "passed": self.passed, "problems": self.problems, "notes": self.notes,
            "generation": self.generation,
        }


def smoke_summary(smoke: dict | None) -> dict | None:
    """What a table of GGUF types shows of one smoke test (an ``eval.gguf`` record): the gguf exporter
    stores it per type, reports rebuild it from ``eval.gguf`` for single-type exports."""
    if not smoke:
        return None
    hf = smoke.get("hf_rouge1_same_examples")
    return {"rouge1": smoke["rouge1"], "rougeLsum": smoke.get("rougeLsum"), "n": smoke.get("n"), "hf_rouge1": hf,
            "delta_rouge1": round(smoke["rouge1"] - hf, 2) if hf is not None else None,
            "delta_rouge1_se": (smoke.get("change_vs_hf") or {}).get("standard_error"),
            "agreement_rouge1": (smoke.get("agreement_with_hf") or {}).get("rouge1"),
            "tokens_per_second": (smoke.get("generation") or {}).get("tokens_per_second"),
            "passed": smoke.get("passed"), "eval_time_s": smoke.get("eval_time_s")}


def _some(ids: list[str], shown: int = 3) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def smoke_workers(gguf: str | Path) -> int:
    """Worker processes for the smoke test: one per core, each answering its share of the examples
    one at a time with one llama.cpp thread. For a model this small a llama.cpp thread spends much of
    each token waiting at the barriers between small operations, so separate processes do more
    (benchmarks/README.md), and the answers are the same (a matrix product's rows are split between
    threads, never a dot product, so the thread count does not change the arithmetic). Each worker
    holds its own copy of the weights: at most half the available memory goes to them."""
    workers = cpu_threads()
    try:
        import psutil  # a dependency of accelerate

        fit = int(psutil.virtual_memory().available * 0.5 // max(Path(gguf).stat().st_size * 1.2, 1))
        workers = min(workers, max(fit, 1))
    except (ImportError, OSError):
        pass
    return max(workers, 1)


def answer_in_workers(gguf: str, examples: list[dict], prompt, max_new_tokens: int, *, parallel: int = SMOKE_PARALLEL,
                      workers: int = 1, progress=None) -> dict:
    """``answer_examples`` over ``workers`` child processes side by side, each with its share of the
    examples (every ``workers``-th, so that long and short dialogues spread evenly) and
    cores // workers llama.cpp threads. Answers come back in the examples' order. A native crash in
    any worker raises NativeCrash here and stops the others (``kit.run_isolated_side_by_side``)."""
    workers = max(1, min(workers, len(examples)))
    threads = max(1, cpu_threads() // workers)
    start = time.perf_counter()
    outs = run_isolated_side_by_side(answer_examples, [(gguf, examples[i::workers], prompt, max_new_tokens, parallel)
                                                       for i in range(workers)],
                                     threads=threads, progress=progress, what=f"llama.cpp answering with '{Path(gguf).name}'",
                                     fix=LLAMA_CRASH_FIX)
    answers: list[Answer | None] = [None] * len(examples)
    for i, out in enumerate(outs):
        answers[i::workers] = out["answers"]
    timings = {key: round(sum(out[key] for out in outs), 2) for key in BATCH_TIMINGS if all(key in out for out in outs)}
    return {"answers": answers, "generated_tokens": sum(out["generated_tokens"] for out in outs),
            "decode_s": time.perf_counter() - start, "parallel": parallel, "workers": workers, "threads": threads, **timings}


def smoke_test(gguf: str | Path, examples: list[dict], prompt, *, max_new_tokens: int = 64,
               hf_predictions: dict[str, str] | None = None, margin: float = 1.5, parallel: int = SMOKE_PARALLEL,
               workers: int | None = None, progress=None) -> SmokeResult:
    """Answer ``examples`` (dicts with id, dialogue, summary) with the GGUF and check the answers.
    ``hf_predictions`` maps example id -> the HF model's prediction, for agreement and the margin.
    llama.cpp runs in child processes (``workers``, default ``smoke_workers``): a crash there raises
    NativeCrash here, the caller lives on."""
    if not examples:
        raise PeftbenchError("no examples to run the smoke test on.", "check --data and -n.")
    require_gguf_file(gguf)
    start = time.perf_counter()
    examples = [{"id": ex["id"], "dialogue": ex["dialogue"], "summary": ex["summary"]} for ex in examples]
    out = answer_in_workers(str(gguf), examples, prompt, max_new_tokens, parallel=parallel,
                            workers=workers or smoke_workers(gguf), progress=progress)
    answers = out.pop("answers")
    out["tokens_per_second"] = round(out["generated_tokens"] / max(out["decode_s"], 1e-9), 1)
    out["decode_s"] = round(out["decode_s"], 2)
    references = [ex["summary"] for ex in examples]
    result = SmokeResult(gguf=str(gguf), answers=answers, references=references,
                         scores=rouge([a.text for a in answers], references),
                         seconds=time.perf_counter() - start, margin=margin, generation=out)
    if hf_predictions is not None:
        missing = [a.id for a in answers if a.id not in hf_predictions]
        if missing:
            raise PeftbenchError(f"the HF predictions have no entry for {len(missing)} example(s), e.g. '{missing[0]}'.",
                                 "pass the predictions_finetuned.jsonl of a run on the same data.")
        hf = [hf_predictions[a.id] for a in answers]
        result.hf_scores = rouge(hf, references)
        result.agreement = rouge([a.text for a in answers], hf)
        result.change = paired_rouge1_change([a.text for a in answers], hf, references)
    return result.check()


def write_answers(path: Path, result: SmokeResult) -> None:
    lines = [json.dumps({"id": a.id, "prediction": a.text, "reference": ref, "ended_at_eot": a.ended_at_eot,
                         "leaked": a.leaked, "tokens": a.tokens}, ensure_ascii=False)
             for a, ref in zip(result.answers, result.references)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def smoke_in_run(gguf: Path, ctx, margin: float, label: str) -> tuple[dict, list[str]]:
    """The smoke test on the examples the run evaluated, against the fine-tuned model's predictions."""
    if ctx.eval_dataset is None:
        return {}, [f"{label}: no evaluation examples to run the smoke test on"]
    r = ctx.recipe.recipe
    examples = [dict(row) for row in ctx.eval_dataset]
    hf_file = ctx.run_dir / "predictions_finetuned.jsonl"
    try:  # a smoke test that cannot run is a failed check; the files and their record stay
        hf = read_predictions(hf_file) if hf_file.is_file() else None
        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task(label, total=len(examples))
            result = smoke_test(gguf, examples, r.prompt, max_new_tokens=r.evaluation.max_new_tokens,
                                hf_predictions=hf, margin=margin, progress=lambda n: bar.advance(task, n))
    except PeftbenchError as e:
        return {}, [f"{label}: {e.problem}"]
    write_answers(ctx.run_dir / f"predictions_{label.replace(' ', '_')}.jsonl", result)
    return result.as_record(), [f"{label}: {p}" for p in result.problems]
