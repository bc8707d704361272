"""The merged checkpoint of a run: the trained weights folded into the base model and saved as a
standard transformers checkpoint (safetensors, config, tokenizer with its chat template) in
exports/merged/. Every exporter that needs plain weights (merged, gguf, ...) asks for it here:
``merged_checkpoint`` writes it once per run and reuses it while the adapter it came from is
unchanged, so no run merges twice. How a method merges is the method's business (``MethodPlugin.merge``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from peftbench.console import console
from peftbench.files import atomic_directory, atomic_write_json

MARKER = "peftbench_merge.json"  # which adapter the checkpoint was merged from


def adapter_fingerprint(adapter_dir: Path) -> str:
    """Hash of what the method saved: a merged checkpoint is reused only for the same adapter."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(adapter_dir).rglob("*") if p.is_file()):
        digest.update(f.relative_to(adapter_dir).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def merged_checkpoint(ctx, dtype: str = "auto") -> tuple[Path, dict]:
    """exports/merged/ for this run's adapter, merging only if it is not there yet.
    Returns the directory and what the merge recorded (method, seconds, ``reused``)."""
    target = ctx.exports_dir / "merged"
    fingerprint = adapter_fingerprint(ctx.adapter_dir)
    merge_into = getattr(ctx.recipe.method_options, "merge_into", None)  # 4-bit methods: which 16-bit weights
    marker = target / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if (info.get("adapter_sha256") == fingerprint and dtype in ("auto", info.get("dtype"))
                and info.get("merge_into") == merge_into):
            return target, {**info, "reused": True}

    start = time.perf_counter()
    merged = ctx.recipe.method.merge(ctx.model, ctx.recipe.method_options, ctx)  # StageRefused for methods that cannot merge
    if dtype != "auto":
        import torch

        merged = merged.to(getattr(torch, dtype))
    merge_s = time.perf_counter() - start
    with atomic_directory(target) as tmp:  # a kill mid-save leaves no half checkpoint to reuse
        merged.save_pretrained(tmp, safe_serialization=True)
        ctx.tokenizer.save_pretrained(tmp)  # tokenizer files and chat template travel with the weights
        info = {
            "method": ctx.recipe.method.name,
            "adapter_sha256": fingerprint,
            "merge_into": merge_into,
            "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
            "merge_s": round(merge_s, 2),
            "save_s": round(time.perf_counter() - start - merge_s, 2),
        }
        atomic_write_json(tmp / MARKER, info)
    del merged
    console.print(f"merged {info['method']} into the base model in {info['merge_s']} s -> {target}")
    return target, {**info, "reused": False}
