#!/usr/bin/env python
"""Per-token overhead of a decode step: wall time per step, time inside the linears (the
quantized GEMVs / dense matmuls, lm_head included), and everything else (norms, RoPE, SiLU·mul,
residuals, attention, sampler, scheduler, output processing, Python dispatch), in three modes in
the same process, rounds interleaved: plain (PyTorch ops), fused (the fused CPU ops of
layers/fused.py, called layer by layer from Python) and plan (the one-call decode step,
csrc/fused_ops.cpp DecodePlan, where every linear is a GGUF block weight; else as fused).

    .venv/bin/python benchmarks/decode_overhead.py [MODEL] [-q int8|int4|auto|none] [--rounds 12]
        [--steps 16] [--context 64] [--threads N] [--random-weights] [--modes plain,fused,plan]

Each round prefills one prompt of --context tokens, then times --steps single-token decode steps
(batch 1) through LLMEngine.step(). Odd rounds time the bare step; even rounds wrap every linear's
forward with a perf_counter pair to split the step (the wrapper's own ~1 us per call lands in
"everything else", so that figure is an upper bound). In plan mode only lm_head is wrapped; the
layers' linears are timed by the plan's own clock around each kernel call (wall time: the
plan's CPU-time column subtracts that wall time too, which is exact with 1 thread only; with more,
the main thread waits inside the linears and the column can even go negative). Medians over rounds; the machine's load
average is printed before and after (the 2 vCPUs here are shared: expect noise).

"everything else" is given twice: in wall time, and in the main thread's CPU time
(time.thread_time) outside the linears. The overhead is serial work on the main thread, so its
CPU time stays meaningful when other processes take the cores away (wall time then includes the
waits); the linears run on both cores and are reported in wall time only. The fastest step's
figures (minimum over all timed steps, as timeit advises on a busy machine) bound what the step
costs without interference.

"greedy tokens identical" compares the modes' tokens round by round. Dense models agree; with
int8/int4 weights an occasional near-tie flip on these random-token prompts is expected (the
kernels round activations to int8, which turns ulp-level differences into ~0.05-nat ones; see
BENCHMARKS.md, "Per-token overhead")."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("-q", "--quantization", default="int8")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as configured, 2 here)")
    ap.add_argument("--modes", default="plain,fused,plan",
                    help="comma list of plain (PyTorch ops), fused (the fused ops, layer by layer from Python), "
                         "plan (the one-call decode step where the model allows it; else as fused)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = None if args.quantization in ("none", "dense", "") else args.quantization

    import qwenrun
    from qwenrun import LLM, SamplingParams
    from qwenrun.outputs import OutputKind

    try:
        from qwenrun.layers import fused
    except ImportError:  # a tree from before the fused ops (PYTHONPATH=<old checkout>/src): plain only
        fused = None
        args.modes = "plain"
    if fused is not None and not hasattr(fused, "no_plan"):  # a tree from before the decode plan
        args.modes = ",".join(m for m in args.modes.split(",") if m != "plan")

    print(f"cpu: {cpu_name()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    llm = LLM(args.model, quantization=q, kv_cache_memory=0.25, max_model_len=1024,
              random_weights=args.random_weights)
    eng = llm.engine
    model = eng.loaded.model
    print(f"qwenrun from {os.path.dirname(qwenrun.__file__)}; model {args.model}, quantization {q}, dtype "
          f"{eng.loaded.dtype}, fused ops available: {fused is not None and fused.ops() is not None}")
    sp = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)
    lin_time = [0.0, 0.0]  # wall, main-thread cpu
    lins = [m for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))]
    plain_fwd = {m: m.forward for m in lins}

    def plan_seconds() -> float:  # time the one-call decode step spent in its linears (its own clock)
        got = model.__dict__.get("_plan")
        return got[0].seconds()["linears"] if got is not None else 0.0

    def timers(on: bool, mode: str = "") -> None:
        for m in lins:
            # the plan runs the layers' linears itself (a Python wrapper on them turns it off):
            # only the head is wrapped, the rest comes from the plan's clock
            if not on or (mode == "plan" and m is not model.lm_head):
                m.__dict__.pop("forward", None)
                continue

            def timed(x, _f=plain_fwd[m]):
                t, c = time.perf_counter(), time.thread_time()
                y = _f(x)
                lin_time[1] += time.thread_time() - c
                lin_time[0] += time.perf_counter() - t
                return y

            m.forward = timed

    def round_(mode: str, salt: int) -> tuple[list[tuple[float, float, float, float]], list[int]]:
        prompt = [1000 + (salt * 131 + j * 17) % 50000 for j in range(args.context)]
        eng.block_manager.reset_prefix_cache()
        eng.add_request(f"r{salt}-{mode}", None, sp, prompt_token_ids=prompt, output_kind=OutputKind.DELTA)
        ctx = (fused.disabled() if mode == "plain" else fused.no_plan() if mode == "fused" else _null()) \
            if fused is not None else _null()
        steps, toks = [], []
        with ctx:
            for o in eng.step():  # prefill (+ first token)
                toks.extend(o.outputs[0].token_ids)
            while eng.has_unfinished_requests():
                lin_time[0] = lin_time[1] = 0.0
                p0 = plan_seconds()
                t, c = time.perf_counter(), time.thread_time()
                outs = eng.step()
                c, t = time.thread_time() - c, time.perf_counter() - t
                # the plan's linears run on the main thread too (and the pool): wall and cpu alike
                pl = plan_seconds() - p0 if mode == "plan" else 0.0
                steps.append((t, c, lin_time[0] + pl, lin_time[1] + pl))
                for o in outs:
                    toks.extend(o.outputs[0].token_ids)
        return steps, toks

    modes = args.modes.split(",")
    for m in modes:  # warm-up
        round_(m, 0)
    res = {m: {"bare": [], "timed": []} for m in modes}
    same = True
    for r in range(args.rounds):
        timed = r % 2 == 1
        toks = {}
        for m in (modes if r % 4 < 2 else modes[::-1]):
            timers(timed, m)
            steps, toks[m] = round_(m, r + 1)
            res[m]["timed" if timed else "bare"] += steps
        same &= all(t == toks[modes[0]] for t in toks.values())
    timers(False)
    med = statistics.median
    print(f"batch 1, context {args.context}, {args.rounds} rounds x {args.steps} decode steps "
          f"(half bare, half with linear timers), medians, ms per token:")
    for m in modes:
        bare = med([s[0] for s in res[m]["bare"]]) * 1e3
        tm = res[m]["timed"]
        step, lin = med([s[0] for s in tm]) * 1e3, med([s[2] for s in tm]) * 1e3
        other = med([s[0] - s[2] for s in tm]) * 1e3
        other_cpu = med([s[1] - s[3] for s in tm]) * 1e3
        lo = min(s[0] - s[2] for s in tm) * 1e3
        lo_cpu = min(s[1] - s[3] for s in tm) * 1e3
        print(f"  {m:6} step {bare:7.2f} ({1e3 / bare:5.1f} tok/s) | timed step {step:7.2f} = linears {lin:7.2f}"
              f" + everything else {other:5.2f} wall, {other_cpu:5.2f} main-thread cpu"
              f" (fastest step: {lo:5.2f} wall, {lo_cpu:5.2f} cpu)")
    if len(modes) > 1:
        print(f"  greedy tokens identical across modes, every round: {same}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
