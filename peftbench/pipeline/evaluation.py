"""Evaluation: batched greedy summaries and ROUGE.

ROUGE comes from rouge-score with the Porter stemmer, averaged per example: the numbers
``evaluate.load("rouge").compute(..., use_stemmer=True, use_aggregator=False)`` gives, averaged.
ROUGE-1/2/L score the texts as they are. ROUGE-Lsum is summary-level LCS over sentences, which
rouge-score reads as lines: as in the Hugging Face summarisation examples (``run_summarization.py``
puts one ``nltk.sent_tokenize`` sentence per line in both prediction and reference), both texts are
split into sentences first. Without that, a one-line prediction makes ROUGE-Lsum equal ROUGE-L.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftbench.errors import PeftbenchError
from peftbench.pipeline.chat import encode_prompt, stop_token_ids

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# What the reports say under their ROUGE columns (the module docstring says why).
ROUGE_CONVENTION = ("ROUGE: rouge-score F-measures with the Porter stemmer, averaged over examples (what `evaluate`'s "
                    "rouge gives with use_stemmer=True). ROUGE-1/2/L score each text as it is; ROUGE-Lsum puts one "
                    "sentence per line in prediction and reference first (nltk Punkt), as the Hugging Face "
                    "summarisation examples do.")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures in percent, plus ``n``."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    tokenizer = _stemming_tokenizer()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    summary_scorer = rouge_scorer.RougeScorer(["rougeLsum"], tokenizer=tokenizer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = {**scorer.score(ref, pred),
                  **summary_scorer.score(sentences_per_line(ref), sentences_per_line(pred))}
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = len(predictions)
    out = {key: round(100 * totals[key] / n, 4) if n else 0.0 for key in ROUGE_TYPES}
    out["n"] = n
    return out


def paired_rouge1_change(predictions: list[str], baseline: list[str], references: list[str]) -> dict[str, float]:
    """How much ``predictions`` gain over ``baseline`` in ROUGE-1 (percent) on the same examples: the mean
    of the per-example differences and its standard error (stdev / sqrt(n)). Both answer the same
    examples, so this error is far smaller than either score's own spread (a GGUF against its HF model:
    0.3-0.4 points on 818 SAMSum dialogues)."""
    import statistics

    diffs = [new - old for new, old in zip(example_rouge1(predictions, references), example_rouge1(baseline, references),
                                           strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"change": round(statistics.fmean(diffs), 4), "standard_error": round(se, 4), "n": len(diffs)}


def example_rouge1(predictions: list[str], references: list[str]) -> list[float]:
    """Each example's ROUGE-1 F-measure in percent, scored as ``rouge`` scores (the paired comparisons' unit)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], tokenizer=_stemming_tokenizer())
    return [100 * scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def _stemming_tokenizer():
    """rouge-score's own tokenizer with the Porter stemmer (``use_stemmer=True``), with each word's
    stem remembered: rouge-score 0.1.2 stems every token of every text afresh, which was most of the
    time of scoring a validation split. Same tokens, same scores."""
    import functools

    from rouge_score.tokenizers import DefaultTokenizer

    tokenizer = DefaultTokenizer(use_stemmer=True)
    tokenizer._stemmer.stem = functools.lru_cache(maxsize=None)(tokenizer._stemmer.stem)
    return tokenizer


def sentences_per_line(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum. nltk's Punkt splitter with its default parameters:
    ``nltk.sent_tokenize`` (what the HF examples call) needs the ``punkt`` model downloaded from the
    internet, which peftbench does not assume; the untrained splitter differs from it mainly on
    abbreviations ("Dr. Smith")."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return "\n".join(PunktSentenceTokenizer().tokenize(" ".join(text.split())))


@dataclass
class Evaluation:
    scores: dict
    predictions: list[str]
    seconds: float

    def as_record(self) -> dict:
        mean_words = sum(len(p.split()) for p in self.predictions) / max(len(self.predictions), 1)
        return {**self.scores, "mean_summary_words": round(mean_words, 2), "eval_time_s": round(self.seconds, 2)}


CPU_BATCH = 16  # a CPU's decoding step grows with the batch: larger batches only pad more
MAX_AUTO_BATCH = 1024  # SAMSum's 819 in one batch: a decoding step grows far slower than the batch on a GPU
AUTO_MEMORY_SHARE = 0.25  # of the free GPU memory, for the KV cache of one batch


def auto_batch_size(model, longest_tokens: int, num_beams: int = 1) -> int:
    """The largest batch (a power of two up to MAX_AUTO_BATCH) whose KV cache for sequences of
    ``longest_tokens`` fits in a quarter of the free GPU memory; CPU_BATCH on the CPU."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return CPU_BATCH
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dtype_bytes = param.element_size() if param.is_floating_point() else 2  # a packed 4-bit weight: bf16 cache
    per_sequence = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes * longest_tokens * num_beams
    from peftbench.pipeline.device import free_gpu_memory

    free = free_gpu_memory()
    batch = MAX_AUTO_BATCH
    while batch > 1 and batch * per_sequence > AUTO_MEMORY_SHARE * free:
        batch //= 2
    return batch


@torch.no_grad()
def generate_summaries(model, tokenizer, prompt, dialogues: list[str], *, batch_size: int | str = 16,
                       max_new_tokens: int = 64, num_beams: int = 1, progress=None,
                       cache_implementation: str | None = None) -> list[str]:
    """Greedy (or beam-search) summaries, batched. Prompts are sorted by length so each batch carries little padding,
    padded on the left so every sequence's next token is at the same position. ``cache_implementation``:
    transformers' KV cache (None: its default, the dynamic cache; "static": preallocated)."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt, d) for d in dialogues]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    if batch_size == "auto":
        batch_size = auto_batch_size(model, max(map(len, encoded), default=0) + max_new_tokens, num_beams)
    outputs: list[str] = [""] * len(encoded)
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stops, pad_token_id=pad_id,
            num_beams=num_beams, early_stopping=True if num_beams > 1 else None,
            temperature=None, top_p=None, top_k=None,  # greedy: silence the sampling defaults of chat models
            **({"cache_implementation": cache_implementation} if cache_implementation else {}),
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return outputs


def evaluate_model(model, tokenizer, prompt, dataset, options, progress=None) -> Evaluation:
    start = time.perf_counter()
    predictions = generate_summaries(
        model, tokenizer, prompt, list(dataset["dialogue"]), batch_size=options.batch_size,
        max_new_tokens=options.max_new_tokens, num_beams=options.num_beams, progress=progress,
    )
    seconds = time.perf_counter() - start
    return Evaluation(rouge(predictions, list(dataset["summary"])), predictions, seconds)


def read_predictions(path: str | Path) -> dict[str, str]:
    """id -> prediction from a predictions_*.jsonl file that a run wrote."""
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"predictions file '{path}' does not exist.", "pass runs/<run>/predictions_finetuned.jsonl.")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = row["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PeftbenchError(f"line {i} of '{path}' is not a prediction record.",
                                 "pass a predictions_*.jsonl written by `peftbench run` ({\"id\", \"prediction\", ...}).") from None
    return out
