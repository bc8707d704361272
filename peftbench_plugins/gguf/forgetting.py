"""The forgetting probe in llama.cpp: the GGUF's language-modelling loss on general text.

The same texts and the same loss as the HF model's probe (``kit.text_loss``: mean negative log-likelihood
per token, the beginning-of-sequence token first, no chat template), computed from llama.cpp's logits, so a
GGUF's figure sits beside its HF model's and each text's loss pairs with the HF one.
"""

from __future__ import annotations

from peftbench.kit import MAX_TEXT_TOKENS, TextLoss, run_isolated
from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX, cpu_threads, load_gguf



def gguf_text_loss(gguf: str, texts: list[str]) -> TextLoss:
    """The loss of ``gguf`` on ``texts``, in a child process (llama.cpp may crash)."""
    return run_isolated(_text_loss, gguf, texts, what=f"llama.cpp scoring general text with '{gguf}'",
                        fix=LLAMA_CRASH_FIX)


def _text_loss(gguf: str, texts: list[str], progress=None) -> TextLoss:
    import numpy as np

    llm = load_gguf(gguf, n_ctx=MAX_TEXT_TOKENS, threads=cpu_threads(), logits_all=True)
    bos = [llm.token_bos()] if llm.token_bos() >= 0 else []
    per_text, total, tokens = [], 0.0, 0
    for text in texts:
        ids = (bos + llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))[:MAX_TEXT_TOKENS]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        log_z = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
        nll = log_z - logits[np.arange(len(ids) - 1), ids[1:]]
        per_text.append(float(nll.mean()))
        total += float(nll.sum())
        tokens += len(nll)
        if progress:
            progress()
    return TextLoss(loss=total / max(tokens, 1), per_text=per_text, tokens=tokens)
