"""Where does prefix tuning's NaN at step 1 (bf16, GPU) come from? One forward/backward of a real
SAMSum batch through peftbench's own prefix_tuning plugin, in each combination of dtype, attention,
padding side and prefix initialisation; prints loss, grad norm and where NaNs first appear.

  python benchmarks/diagnostics/diag_prefix_nan.py MODEL(.gguf or dir) SAMSUM_TRAIN.jsonl     (needs CUDA)

On one H200 (2026-12-01) every combination gave finite gradients (reports/compare_samsum.md, notes)."""
import itertools
import json
import sys

import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from peftbench.pipeline.chat import encode_example
from peftbench.pipeline.modeling import load_tokenizer, resolve_model_source
from peftbench.pipeline.recipe import PromptSection
from peftbench_plugins.methods.prefix_tuning import PrefixTuning, PrefixTuningOptions

source = resolve_model_source(sys.argv[1])
rows = [json.loads(line) for line in open(sys.argv[2])][:8]
tok = load_tokenizer(source)
prompt = PromptSection(template="Summarize this dialogue:\n{dialogue}", max_source_tokens=448, max_target_tokens=64)
feats = [encode_example(tok, prompt, r["dialogue"], r["summary"]) for r in rows]


class Ctx:
    tokenizer = tok


for dtype, attn, side, init in itertools.product([torch.bfloat16, torch.float32], ["sdpa", "eager"], ["right", "left"],
                                                 ["text", None]):
    tok.padding_side = side
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)(feats[:4])
    batch = {k: v.cuda() for k, v in batch.items()}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn).cuda()
    model = PrefixTuning().apply(model, PrefixTuningOptions(num_virtual_tokens=20, init_text="Summarize the dialogue in one or two sentences." if init else None), Ctx)
    nan_at = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: nan_at.append(n) if isinstance(o, tuple) and torch.is_tensor(o[0]) and not torch.isfinite(o[0]).all() else None)
             for n, m in model.named_modules() if n.endswith(("self_attn", "mlp"))]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    gn = torch.norm(torch.stack([g.float().norm() for g in grads])).item()
    print(f"{str(dtype):15} {attn:6} pad={side:5} init={init!s:5} loss={out.loss.item():.4f} grad_norm={gn:.4g} "
          f"first_nonfinite={nan_at[:2]}", flush=True)
    for h in hooks:
        h.remove()
    del model
    torch.cuda.empty_cache()
