"""Quantized-linear kernels vs the machine's limits, one JSON line per result.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1 16] [--e2e]

1. The memory-read ceiling: 2 GiB read by an fp32 ``sum`` and by an sgemv, the faster (GB/s).
2. Per shape (Qwen1.5-4B and the 0.5B demo model) and row count: fp32 ``F.linear``, qwenrun int8
   and int4 (module forward: the path the model runs, Python overhead included), fbgemm dynamic
   int8 when available — as GB/s of weight bytes read and % of the ceiling. Weights are rotated
   over copies totalling > 2x the last-level cache, so every call streams from DRAM as in a
   real decode step (the same small matrix called repeatedly would be served from L3).
3. A decode estimate per model: the sum of its linears' single-row times (tokens/s upper bound:
   attention, norms and sampling excluded); ``--e2e`` also times real greedy decoding with the
   demo model (dense/int8/int4) and the 4B config with random weights (int8/int4).
Timings: median and best of repeated calls (see ``times``); the load average is printed at the
start and the end: on a busy machine only the best-of numbers mean anything."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.quant import kernels
from qwenrun.quant.linear import Int4Linear, Int8Linear

# (model, name, K, O, count per token)
SHAPES = [
    ("4B", "q/k/v/o", 2560, 2560, 40 * 4), ("4B", "qkv", 2560, 7680, 0), ("4B", "gate/up", 2560, 6912, 40 * 2),
    ("4B", "down", 6912, 2560, 40), ("4B", "lm_head", 2560, 151936, 1),
    ("demo", "q/o", 896, 896, 24 * 2), ("demo", "k/v", 896, 128, 24 * 2), ("demo", "gate/up", 896, 4864, 24 * 2),
    ("demo", "down", 4864, 896, 24), ("demo", "lm_head", 896, 151936, 1),
]


def llc_bytes() -> int:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split(":")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 64 << 20


def times(fns, reps: int) -> tuple[float, float]:
    """(median, best) seconds over reps calls cycling through fns. On a shared machine the
    median catches other processes (a 2-thread call waits a whole time slice when one core is
    taken), the best does not; both are reported."""
    ts = []
    for i in range(reps):
        f = fns[i % len(fns)]
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return ""


def emit(**kv) -> None:
    print(json.dumps(kv), flush=True)


def ceiling() -> dict[str, float]:
    """Read bandwidth over 2 GiB: an fp32 sum and an MKL sgemv (the faster of the two is the
    ceiling: torch's sum alone under-reads by ~20% on some machines)."""
    a = torch.ones(512 << 20)  # 2 GiB fp32
    m, x = a.view(-1, 4096), torch.ones(4096)
    out = {}
    for name, f in (("sum", a.sum), ("sgemv", lambda: torch.mv(m, x))):
        f()
        out[name] = a.numel() * 4 / times([f], 9)[1] / 1e9
    return out


def bench_shape(K: int, O: int, rows: list[int], rotate: int, reps: int) -> dict:
    """{(impl, N): (median s, best s, bytes)} for one weight shape."""
    res = {}
    w = torch.randn(O, K) * 0.02
    impls: dict[str, tuple[list, int]] = {}
    n_f32 = max(1, -(-rotate // (O * K * 4)))
    impls["fp32"] = ([w] + [w.clone() for _ in range(n_f32 - 1)], O * K * 4)
    for name, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        m = cls(w)
        mods = [m] + [copy.deepcopy(m) for _ in range(max(1, -(-rotate // m.weight_bytes)) - 1)]
        impls[name] = (mods, m.weight_bytes)
    try:
        from torch.ao.quantization import quantize_dynamic

        base = nn.Sequential(nn.Linear(K, O, bias=False))
        base[0].weight.data = w
        qd = [quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)
              for _ in range(max(1, -(-rotate // (O * K))))]
        impls["fbgemm_int8"] = (qd, O * K)
    except Exception:  # no fbgemm in this build
        pass
    with torch.inference_mode():
        for impl, (objs, nbytes) in impls.items():
            for n in rows:
                x = torch.randn(n, K)
                if impl == "fp32":
                    fns = [lambda t=t: F.linear(x, t) for t in objs]
                else:
                    fns = [lambda o=o: o(x) for o in objs]
                for f in fns[:2]:
                    f()
                res[impl, n] = (*times(fns, max(reps, 2 * len(fns) + 1)), nbytes)
    return res


def read_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row),
    unless the head is tied to it (then the head reads it all, counted once)."""
    seen, total = set(), 0
    for name, mod in model.named_modules():
        if name.endswith("embed_tokens"):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def e2e(threads: int) -> None:
    from qwenrun import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    runs = [("demo", q, {}) for q in (None, "int8", "int4")]
    runs += [("Qwen/Qwen1.5-4B-Chat", q, {"random_weights": True}) for q in ("int8", "int4")]
    for model, q, extra in runs:
        t0 = time.perf_counter()
        llm = LLM(model, quantization=q, kv_cache_memory=1.0, **extra)
        load = time.perf_counter() - t0
        ids = [[9707, 11, 1879, 0, 3555, 374, 279, 6722, 315, 9625, 30]]
        llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=4))
        tps = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=1))
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = llm.generate(prompt_token_ids=ids, sampling_params=sp)[0].outputs[0]
            dt = time.perf_counter() - t0 - t_prefill
            tps.append((len(out.token_ids) - 1) / dt)
        wb = read_per_token(llm.engine.loaded.model)
        tok_s = sorted(tps)[1]
        emit(kind="e2e_decode", model=model, quantization=q or "none", threads=threads, tokens_per_s=round(tok_s, 2),
             weight_gb_read_per_token=round(wb / 1e9, 3), weight_gb_per_s=round(wb * tok_s / 1e9, 2),
             load_s=round(load, 1))
        del llm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--models", nargs="+", default=["4B", "demo"])
    ap.add_argument("--e2e", action="store_true", help="also time real greedy decoding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k = kernels.ops()
    common = dict(device=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                  commit=commit(), kernels=k is not None)
    emit(kind="env", cpu=next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""),
         llc_mb=llc_bytes() >> 20, kernel_unavailable=kernels.unavailable_reason(), loadavg=os.getloadavg(), **common)
    reads = ceiling()
    ceil = max(reads.values())
    emit(kind="ceiling", what="read 2 GiB: max of fp32 sum and sgemv", gb_per_s=round(ceil, 2),
         **{f"{k}_gb_per_s": round(v, 2) for k, v in reads.items()}, **common)
    rotate = 2 * llc_bytes()
    est: dict[tuple[str, str], float] = {}
    for model, name, K, O, count in SHAPES:
        if model not in args.models:
            continue
        res = bench_shape(K, O, args.rows, rotate, args.reps)
        for (impl, n), (t, tbest, nbytes) in res.items():
            gbs, best = nbytes / t / 1e9, nbytes / tbest / 1e9
            emit(kind="linear", model=model, layer=name, in_features=K, out_features=O, rows=n, impl=impl,
                 us=round(t * 1e6, 1), us_best=round(tbest * 1e6, 1), weight_mb=round(nbytes / 2**20, 1),
                 gb_per_s=round(gbs, 2), pct_ceiling=round(100 * gbs / ceil, 1), gb_per_s_best=round(best, 2),
                 pct_ceiling_best=round(100 * best / ceil, 1), gmac_per_s=round(n * K * O / t / 1e9, 2), **common)
            if n == 1:
                m, b = est.get((model, impl), (0.0, 0.0))
                est[model, impl] = (m + count * t, b + count * tbest)
    for (model, impl), (t, tbest) in est.items():
        emit(kind="decode_estimate", model=model, impl=impl, linears_ms_per_token=round(t * 1e3, 2),
             tokens_per_s_upper_bound=round(1 / t, 2), tokens_per_s_upper_bound_best=round(1 / tbest, 2), **common)
    emit(kind="load", loadavg_end=os.getloadavg(), **common)
    if args.e2e:
        e2e(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
