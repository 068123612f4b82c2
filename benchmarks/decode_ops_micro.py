#!/usr/bin/env python
"""Per-call costs of the pieces of a decode step, in main-thread CPU time (time.thread_time, best
of 7 rounds): the fused decode attention at demo and Qwen1.5-4B head shapes over 64 / 160 / 1024
tokens of context, greedy argmax over Qwen's 151,936 logits, the fused norm / SiLU ops, and the
Python + dispatch cost of a quantized linear's forward on a tiny weight (64 x 256, so the
arithmetic is ~nothing).

    .venv/bin/python benchmarks/decode_ops_micro.py [--threads 1]
    PYTHONPATH=<another checkout>/src .venv/bin/python benchmarks/decode_ops_micro.py   # A/B a tree

Runs against whichever qwenrun is imported (a tree without an op prints "-" for it)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def bench(f, n: int) -> float:
    best = 1e9
    for _ in range(7):
        t = time.thread_time()
        for _ in range(n):
            f()
        best = min(best, (time.thread_time() - t) / n * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import qwenrun
    from qwenrun.layers import fused

    ops = fused.ops()
    if ops is None:
        print("fused ops unavailable")
        return 1
    print(f"qwenrun from {Path(qwenrun.__file__).parent}; torch threads {args.threads}; us per call (CPU time)")
    S = 4096
    for H, Hkv, d, name in ((14, 2, 64, "demo 14/2 heads x 64"), (20, 20, 128, "4B 20/20 heads x 128")):
        row = []
        for ctx in (64, 160, 1024):
            qkv = torch.randn(1, (H + 2 * Hkv) * d)
            kv = torch.randn(1, 2, S, Hkv, d)
            rope = torch.randn(S, 2, d)
            pos, sm, lens = torch.tensor([ctx - 1]), torch.tensor([ctx - 1]), torch.tensor([ctx])
            slots = torch.empty(0, dtype=torch.long)
            f = lambda: ops.decode_step_attention(qkv, rope, pos, kv, 0, sm, slots, 0, lens, H, Hkv, 0, d ** -0.5)  # noqa: E731
            row.append(f"ctx {ctx}: {bench(f, 2000 if ctx < 1000 else 200):8.1f}")
        print(f"decode attention, {name:22s} " + "  ".join(row))
    x = torch.randn(1, 151936)
    print(f"argmax 151936 logits: torch {bench(lambda: x.argmax(dim=-1).tolist(), 300):.1f}", end="")
    am = getattr(ops, "argmax_rows", None)
    print(f", argmax_rows {bench(lambda: am(x, 151936), 300):.1f}" if am else ", argmax_rows -")
    gu, h, r, w = torch.randn(1, 2 * 4864), torch.randn(1, 896), torch.randn(1, 896), torch.randn(896)
    print(f"silu_mul 4864: {bench(lambda: ops.silu_mul(gu), 3000):.2f}   rms_norm 896: "
          f"{bench(lambda: ops.rms_norm(h, w, 1e-6), 3000):.2f}   add_rms_norm_ 896: "
          f"{bench(lambda: ops.add_rms_norm_(h, r, w, 1e-6), 3000):.2f}")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_gguf_native import gguf_blocks

    from qwenrun.quant.gguf_linear import GGUFLinear, pack
    from qwenrun.quant.linear import Int4Linear, Int8Linear

    O, K = 64, 256
    xs = torch.randn(1, K)
    lins = {"GGUF Q4_K": GGUFLinear(pack("Q4_K", gguf_blocks("Q4_K", O, K), (O, K)), torch.randn(O)),
            "int8": Int8Linear(torch.randn(O, K) * 0.05, torch.randn(O)),
            "int4": Int4Linear(torch.randn(O, K) * 0.05, torch.randn(O))}
    print("linear forward, 64 x 256, 1 row: " + "   ".join(
        f"{k} {bench(lambda m=m: m.forward(xs), 20000):.2f}" for k, m in lins.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
