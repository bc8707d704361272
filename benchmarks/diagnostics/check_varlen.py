"""GPU check of peftbench's packed attention: varlen_attention_forward (torch's flash varlen kernel)
against SDPA run on each sequence alone, forward and backward, grouped-query heads, bf16 and fp32
inputs under autocast (as QLoRA hands them). Prints relative errors; exits 1 if any is off.

  python benchmarks/diagnostics/check_varlen.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peftbench_plugins.trainers.packing import varlen_attention_available, varlen_attention_forward  # noqa: E402


def reference(q, k, v, lengths):
    """(1, heads, tokens, dim) -> (1, tokens, heads, dim), causal SDPA per sequence, in float32."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[:, :, start:start + n].float() for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def main() -> int:
    print("torch", torch.__version__)
    if not varlen_attention_available("cuda"):
        print("no varlen kernel on this machine")
        return 1
    torch.manual_seed(0)
    lengths = [37, 300, 5, 512, 129]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    worst = 0.0
    for dtype, autocast in [(torch.bfloat16, False), (torch.float32, True)]:
        q = torch.randn(1, 32, sum(lengths), 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=dtype, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, _ = varlen_attention_forward(None, q, k, v, None, scaling=64**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                              max_length_q=max(lengths), max_length_k=max(lengths))
        grad = torch.randn_like(out, dtype=torch.float32)
        out.float().backward(grad)
        got = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
        for t in (q, k, v):
            t.grad = None
        ref_out = reference(q, k, v, lengths)
        ref_out.backward(grad)
        want = [ref_out, q.grad.float(), k.grad.float(), v.grad.float()]
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
            rel = ((a - b).norm() / b.norm()).item()
            worst = max(worst, rel)
            print(f"{str(dtype):15} autocast={autocast!s:5} {name}: relative error {rel:.2e}")
    ok = worst < 2e-2  # bf16 operands: 1e-3 .. 1e-2
    print("OK" if ok else "MISMATCH", f"(worst {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
