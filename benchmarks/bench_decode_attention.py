"""Decode attention alone (csrc/fused_ops.cpp decode_step_attention: RoPE, KV write, attention) at
Qwen1.5-4B shapes (20 MHA heads of 128, 40 layers): ms per decode step and GB/s of KV read, per
context length and KV cache dtype. One query token, contiguous slots, a different pool region
per layer as in the model; 2 threads; median of 25 steps after 5 warm-up steps.

    .venv/bin/python benchmarks/bench_decode_attention.py [--ctx 64,288,1024,2048] [--kv float32,float16,bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    from qwenrun.layers import fused
    from qwenrun.layers.rotary import rope_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", default="64,288,1024,2048")
    ap.add_argument("--kv", default="float32,float16,bfloat16")
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=20)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ops = fused.ops()
    if ops is None:
        print("fused ops unavailable")
        return 1
    torch.set_num_threads(args.threads)
    H, Hkv, d, L = args.heads, args.kv_heads, 128, args.layers
    rope = rope_table(d, 5e6, 4096, "cpu")
    no_slots = torch.empty(0, dtype=torch.long)
    for ctx in (int(c) for c in args.ctx.split(",")):
        for name in args.kv.split(","):
            dt = getattr(torch, name)
            kv = torch.randn(L, 2, ctx + 16, Hkv, d).to(dt)
            qkv = torch.randn(1, (H + 2 * Hkv) * d)
            pos, lens = torch.tensor([ctx - 1]), torch.tensor([ctx])
            ts = []
            for rep in range(30):
                t = time.perf_counter()
                for layer in range(L):
                    ops.decode_step_attention(qkv, rope, pos, kv, layer, pos, no_slots, 0, lens, H, Hkv, 0, d ** -0.5)
                ts.append(time.perf_counter() - t)
            t = statistics.median(ts[5:])
            kvb = L * 2 * ctx * Hkv * d * kv.element_size()
            print(f"context {ctx:5d} KV {name:8}: {t * 1e3:7.2f} ms per step ({L} layers), {kvb / t / 1e9:5.1f} GB/s of KV",
                  flush=True)
            del kv
    return 0


if __name__ == "__main__":
    sys.exit(main())
