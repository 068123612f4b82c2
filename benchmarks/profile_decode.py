#!/usr/bin/env python
"""Where a decode step's time goes: the linears (per projection, with their GB/s) against
everything else (attention, norms, RoPE, sampling, scheduling), then torch.profiler's top ops.

    .venv/bin/python benchmarks/profile_decode.py [MODEL] [-q int8|int4] [--batch 1] [--steps 32]
        [--random-weights] [--context 64] [--max-model-len 4096] [--kv-cache-dtype auto]

One process, one engine, nothing else running (2 cores: anything else in parallel skews it).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("-q", "--quantization", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from qwenrun import LLM, SamplingParams
    from qwenrun.outputs import OutputKind

    llm = LLM(args.model, quantization=args.quantization, kv_cache_memory=2.0, max_model_len=args.max_model_len,
              random_weights=args.random_weights, kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine
    model = eng.loaded.model
    sp = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)

    def prompts(salt: int) -> list[list[int]]:
        return [[1000 + (salt * 131 + i * 17 + j) % 50000 for j in range(args.context)] for i in range(args.batch)]

    def decode_steps(salt: int) -> tuple[float, int]:
        """Prefill the batch, then time the pure decode steps."""
        eng.block_manager.reset_prefix_cache()
        for i, p in enumerate(prompts(salt)):
            eng.add_request(f"p{salt}-{i}", None, sp, prompt_token_ids=p, output_kind=OutputKind.DELTA)
        while any(s.num_output_tokens == 0 for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        n, t = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            n += 1
        return time.perf_counter() - t, n

    decode_steps(0)  # warm-up (kernels, allocator)
    wall, n = decode_steps(1)
    step_ms = wall / n * 1e3

    tot: dict[str, float] = collections.defaultdict(float)
    nbytes: dict[str, int] = collections.defaultdict(int)
    for name, m in model.named_modules():
        if name.endswith(("_proj", "lm_head")):
            key = name.split(".")[-1]
            wb = getattr(m, "weight_bytes", None) or m.weight.numel() * m.weight.element_size()

            def timed(x, _orig=m.forward, _key=key, _wb=wb):
                t = time.perf_counter()
                y = _orig(x)
                tot[_key] += time.perf_counter() - t
                nbytes[_key] += _wb
                return y

            m.forward = timed
    decode_steps(2)
    tot.clear()
    nbytes.clear()
    wall2, n2 = decode_steps(3)
    print(f"model {args.model} quantization {args.quantization} dtype {eng.loaded.dtype} batch {args.batch} "
          f"context {args.context}, threads {torch.get_num_threads()}")
    print(f"decode step: {step_ms:.2f} ms ({args.batch * 1e3 / step_ms:.1f} tok/s aggregate); "
          f"with per-linear timers: {wall2 / n2 * 1e3:.2f} ms")
    lin = 0.0
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12} {v / n2 * 1e3:7.2f} ms/step  {nbytes[k] / v / 1e9:6.1f} GB/s of weights")
        lin += v
    print(f"  {'linears':12} {lin / n2 * 1e3:7.2f} ms/step; everything else {(wall2 - lin) / n2 * 1e3:.2f} ms/step")

    # The same linears called back to back with nothing in between (the model's activation dtype,
    # `batch` rows): what the weights cost alone, the rest of a step is everything else.
    lins = [m for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))]
    total = sum(getattr(m, "weight_bytes", None) or m.weight.numel() * m.weight.element_size() for m in lins)
    # inputs in the model's dtype, and in fp32 (for quantized linears: their kernels' native input,
    # so the difference is the cost of converting activations around each call)
    for dt_in in dict.fromkeys((eng.loaded.dtype, torch.float32)):
        xs = {m.in_features: torch.randn(args.batch, m.in_features, dtype=dt_in) for m in lins}
        with torch.inference_mode():
            for m in lins:
                m.forward(xs[m.in_features])
            t = time.perf_counter()
            for _ in range(5):
                for m in lins:
                    m.forward(xs[m.in_features])
            dt = (time.perf_counter() - t) / 5
        print(f"  the {len(lins)} linears back to back, nothing in between, {str(dt_in).replace('torch.', '')} "
              f"inputs: {dt * 1e3:.2f} ms per pass ({total / dt / 1e9:.1f} GB/s)")

    eng.block_manager.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(4)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
