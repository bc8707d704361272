"""Issue 13: bench_train's packed runs stopped at step 1 with "grad_norm became nan" when the tokenizer
had been saved by transformers 5.17 from the SmolLM2 GGUF (no pad token). This reruns that case for
2 steps with global forward/backward hooks and prints the first module whose output or gradient is
not finite, and the tokenizer's special tokens.

  python benchmarks/diagnostics/diag_nopad_nan.py SmolLM2.gguf SAMSUM_TRAIN.jsonl [--model-shape llama1b|tiny] [--runs lora,baseline]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_train
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_train  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("gguf")
p.add_argument("data")
p.add_argument("--model-shape", default="llama1b")
p.add_argument("--runs", default="lora,baseline")
p.add_argument("--pad", default="eos", help="eos (what bench_train does without a pad token) or a token text")
args = p.parse_args()

from transformers import AutoTokenizer, __version__  # noqa: E402

gguf = Path(args.gguf)
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
print("transformers", __version__, "pad", repr(tok.pad_token), "eos", repr(tok.eos_token), tok.eos_token_id,
      "bos", repr(tok.bos_token), tok.bos_token_id, "padding_side", tok.padding_side, flush=True)
saved = Path(tempfile.mkdtemp(prefix="tok-"))
tok.save_pretrained(saved)
tokenizer = AutoTokenizer.from_pretrained(saved)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token if args.pad == "eos" else args.pad
print("after save/load + pad:", repr(tokenizer.pad_token), tokenizer.pad_token_id, flush=True)

first = {}


def check(kind):
    def hook(module, inputs, outputs):
        if kind in first:
            return
        tensors = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        for t in tensors:
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                first[kind] = f"{type(module).__name__} {getattr(module, '_diag_name', '?')} shape {tuple(t.shape)}"
                print(f"first non-finite {kind}: {first[kind]}", flush=True)
                return
    return hook


torch.nn.modules.module.register_module_forward_hook(check("forward output"))
torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: check("gradient")(m, None, gi))

device = "cuda" if torch.cuda.is_available() else "cpu"
shape = bench_train.LLAMA_1B if args.model_shape == "llama1b" else bench_train.TINY
model_dir = Path(tempfile.mkdtemp(prefix="diag-model-"))
bench_train.build_random_model(model_dir, shape, tokenizer, device)
dataset = bench_train.load_examples(args.data, tokenizer, 64)
ids = dataset[0]["input_ids"]
print("example 0:", len(ids), "tokens; pad id occurs", sum(i == tokenizer.pad_token_id for i in ids), "times", flush=True)
for run in args.runs.split(","):
    first.clear()
    try:
        state, info, _ = bench_train.RUNS[run](model_dir=model_dir, tokenizer=tokenizer, dataset=dataset, steps=2,
                                               device=device, seed=0, callbacks=[])
        print(run, "losses", [h.get("loss") for h in state.log_history], "grad norms", [h.get("grad_norm") for h in state.log_history])
    except Exception as e:  # the trainer's non-finite guard
        print(run, "stopped:", type(e).__name__, str(e)[:300])
    print(run, "first non-finite:", first or "none", flush=True)
