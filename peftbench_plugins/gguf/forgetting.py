"""The forgetting probe in llama.cpp: the GGUF's language-modelling loss on general text.

The same texts and the same loss as the HF model's probe (``kit.text_loss``: mean negative log-likelihood
per token, the beginning-of-sequence token first, no chat template), computed from llama.cpp's logits, so a
GGUF's figure sits beside its HF model's and each text's loss pairs with the HF one.
"""

from __future__ import annotations

from peftbench.kit import MAX_TEXT_TOKENS, TextLoss, console, forgetting_texts, run_isolated
from peftbench_plugins.gguf.llama import LLAMA_CRASH_FIX, cpu_threads, load_gguf



def gguf_text_loss(gguf: str, texts: list[str]) -> TextLoss:
    """The loss of ``gguf`` on ``texts``, in a child process (llama.cpp may crash)."""
    return run_isolated(_text_loss, gguf, texts, what=f"llama.cpp scoring general text with '{gguf}'",
                        fix=LLAMA_CRASH_FIX)


def forgetting_in_run(gguf, ctx) -> dict:
    """The run's forgetting probe (``evaluation.forgetting``) on ``gguf``, as the figures the exporter adds to
    eval.gguf (or to its own record when no smoke test ran): ``forgetting_loss``, ``forgetting_perplexity``,
    ``forgetting_tokens``, ``forgetting_per_text``; ``{}`` when the recipe turns the probe off. A llama.cpp
    failure is ``forgetting_note``, not a failed export."""
    evaluation = ctx.recipe.recipe.evaluation
    if not getattr(evaluation, "forgetting", False):
        return {}
    try:
        loss = gguf_text_loss(str(gguf), forgetting_texts(getattr(evaluation, "forgetting_texts", None)))
    except Exception as e:  # llama.cpp crashed or refused: the GGUF itself is still good
        console.print(f"[yellow]note:[/] the GGUF's forgetting probe failed: {type(e).__name__}: {e}")
        return {"forgetting_note": f"not scored ({type(e).__name__}: {e})"}
    console.print(f"GGUF general-text loss: {loss.loss:.4f} (perplexity {loss.perplexity:.2f})")
    return {"forgetting_loss": loss.loss, "forgetting_perplexity": loss.perplexity, "forgetting_tokens": loss.tokens,
            "forgetting_per_text": loss.per_text}


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
