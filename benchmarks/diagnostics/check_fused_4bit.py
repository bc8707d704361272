"""On a GPU: peftbench's fused 4-bit dequantisation (trainers/packing.py: dequantize_nf4, used under trainer.compile)
against bitsandbytes' own, bit for bit, and a compiled 4-bit layer's output and input gradient against bitsandbytes'
eager layer. Prints one line per check and exits non-zero on a mismatch.

  python benchmarks/diagnostics/check_fused_4bit.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from peftbench_plugins.trainers import packing

    failures = 0
    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for nested in (True, False):
            for shape in ((8192, 2048), (576, 1536), (96, 40)):
                weight = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
                packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
                extra = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if nested else None
                ours = packing.dequantize_nf4(packed, state.absmax, state.code.float(), tuple(state.shape), state.dtype,
                                              state.blocksize, extra)
                same = torch.equal(ours, dequantize_4bit(packed, state))
                failures += not same
                print(f"dequantise {quant_type} nested={nested} {shape}: {'identical' if same else 'DIFFERENT'}")

    for nested in (True, False):
        layer = bnb.nn.Linear4bit(2048, 8192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(torch.randn(8192, 2048) / 45, requires_grad=False, quant_type="nf4",
                                         compress_statistics=nested, blocksize=64)
        layer = layer.cuda().train()
        x = torch.randn(1, 3001, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        expected = layer(x)
        (expected_grad,) = torch.autograd.grad(expected.float().square().sum(), x)
        assert packing._fusable_4bit_layers(layer) == [layer]
        packing.install_fused_4bit(layer)
        compiled = torch.compile(layer, dynamic=True)
        got = compiled(x)
        (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
        packing.remove_fused_4bit(layer)
        out_err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        grad_err = ((got_grad.float() - expected_grad.float()).norm() / expected_grad.float().norm()).item()
        ok = out_err < 1e-2 and grad_err < 1e-2
        failures += not ok
        print(f"compiled fused layer nested={nested}: output rel. error {out_err:.2e}, input gradient {grad_err:.2e}"
              f" (bf16 operands: up to ~1e-2){'' if ok else '  MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
