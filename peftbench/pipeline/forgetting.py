"""What fine-tuning costs outside its task: the model's loss on general text, before and after.

A summarisation adapter that scores well on its task may have made the model worse at everything
else. The probe is the language-modelling loss (mean negative log-likelihood per token) on short
general-knowledge paragraphs that have nothing to do with the task (``peftbench/data/general``,
written for peftbench, CC BY 4.0), or on a JSONL file of ``{"text": ...}`` lines the recipe names.
Each text's loss is kept, so a change before -> after is a paired difference on the same texts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import PeftbenchError

BUILTIN_TEXTS = Path(__file__).resolve().parents[1] / "data" / "general" / "general.jsonl"
MAX_TEXT_TOKENS = 2048  # a longer text is scored on its first tokens (the GGUF probe cuts at the same length)


@dataclass
class TextLoss:
    """Mean loss per token over all texts (token-weighted), each text's own mean, and the token count."""

    loss: float
    per_text: list[float]
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def load_texts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The probe's texts: the built-in paragraphs, or the ``text`` of each line of a JSONL file."""
    source = Path(path) if path else BUILTIN_TEXTS
    if not source.is_file():
        raise PeftbenchError(f"forgetting texts '{source}' do not exist.",
                             "name a JSONL file with one {\"text\": ...} per line, or leave the setting out for the built-in texts.")
    texts = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PeftbenchError(f"line {number} of '{source}' has no \"text\".",
                                 "write one JSON object per line with a \"text\" field.") from None
        texts.append(str(text))
    return texts[:limit] if limit else texts


def text_loss(model, tokenizer, texts: list[str]) -> TextLoss:
    """Mean next-token loss of ``model`` on ``texts`` (plain text, no chat template), in eval mode and
    without gradients; the model's training mode is restored after."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_text, total, tokens = [], 0.0, 0
    with torch.no_grad():
        for ids in _encode(tokenizer, texts):  # one at a time: no padding to mask, and the texts are few and short
            input_ids = torch.tensor([ids], device=device)
            # the last len(ids) positions: prompt tuning prepends virtual tokens to the logits
            logits = model(input_ids=input_ids).logits[0, -len(ids):-1].float()
            losses = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none")
            per_text.append(float(losses.mean()))
            total += float(losses.sum())
            tokens += losses.numel()
    model.train(was_training)
    return TextLoss(loss=total / max(tokens, 1), per_text=per_text, tokens=tokens)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's beginning-of-sequence token, if it has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [(bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:MAX_TEXT_TOKENS] for text in texts]


def paired_change(base: list[float], finetuned: list[float]) -> float | None:
    """Standard error of the change in loss, paired text by text: the standard deviation (n - 1) of the
    per-text differences over sqrt(n); None for fewer than two texts or texts that do not pair."""
    n = len(base)
    if n < 2 or len(finetuned) != n:
        return None
    diffs = [b - a for a, b in zip(base, finetuned)]
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) / math.sqrt(n)
