"""``qwenrun bench latency|throughput``: speed measured against the machine's own limits.

Each run first measures the limits that bind inference on this machine: the memory-read ceiling
(GB/s streaming a buffer far larger than cache) and the fp32 matmul compute peak (GFLOP/s). Decode
is then reported as tokens/s and as GB/s of weights (+ KV) read against the ceiling; prefill as
tokens/s and GFLOP/s against the compute peak. One JSON line per result on stdout."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from .outputs import OutputKind
from .sampling_params import SamplingParams
from .settings import BenchConfig


def sig(x: float, digits: int = 3) -> float:
    """Round to ``digits`` significant figures: a small fraction (a tiny model's share of the
    compute peak on a fast CPU) stays visible instead of rounding to 0.0."""
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure_limits(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict[str, float]:
    """The limits that bind inference here, medians of ``repeats``:
    memory-read ceiling (GB/s): the faster of summing and of a matrix-vector product over a
    buffer far larger than cache (the decode access pattern); compute peak (GFLOP/s) of a large
    matmul in fp32 and, when the model runs in another dtype, in that dtype too."""
    big = (1 << 30) if device.type == "cpu" else (4 << 30)
    x = torch.ones(big // 4, dtype=torch.float32, device=device)
    w = x.view(-1, 4096)
    v = torch.ones(4096, dtype=torch.float32, device=device)

    def timed(fn, work: float) -> float:
        rates = []
        for _ in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            rates.append(work / (time.perf_counter() - t))
        return statistics.median(rates[1:])

    bw = max(timed(x.sum, x.nbytes), timed(lambda: torch.mv(w, v), x.nbytes)) / 1e9
    del x, w
    m = 2048 if device.type == "cpu" else 8192
    out = {"mem_read_gbps": bw}
    for dt in dict.fromkeys((torch.float32, dtype)):
        a = torch.randn(m, m, device=device).to(dt)
        out[peak_key(dt)] = timed(lambda: a @ a, 2 * m ** 3) / 1e9
    return out


def peak_key(dtype: torch.dtype) -> str:
    """The limits' key of the matmul peak in ``dtype``: fp32_gflops, bfloat16_gflops, ..."""
    return "fp32_gflops" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')}_gflops"


def _peak(limits: dict[str, float], dtype: torch.dtype) -> float:
    """Compute peak for activations of ``dtype`` (fp32 peak when it was not measured)."""
    return limits.get(peak_key(dtype), limits["fp32_gflops"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _linear_bytes_and_params(model) -> tuple[int, int]:
    """Bytes of weight read per decoded token (every linear incl. the LM head) and linear params."""
    total_b, total_p = 0, 0
    for name, mod in model.named_modules():
        if name.endswith(("_proj", "lm_head")):
            wb = getattr(mod, "weight_bytes", None)
            if wb is None:
                wb = mod.weight.numel() * mod.weight.element_size()
            total_b += wb
            total_p += mod.in_features * mod.out_features
    return total_b, total_p


def _header(args: BenchConfig, eng, limits: dict) -> dict:
    lm = eng.loaded
    return {
        "model": lm.name, "random_weights": bool(args.engine.random_weights), "device": str(lm.device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "dtype": str(lm.dtype).replace("torch.", ""), "quantization": lm.quantization,
        "kv_cache_dtype": args.engine.kv_cache_dtype, "commit": _commit(), **{k: round(v, 2) for k, v in limits.items()},
        **({"speculative": eng.config.speculative_config.method} if eng.spec is not None else {}),
    }


def _spec_fields(eng) -> dict:
    """Acceptance rate and mean accepted length, when speculating."""
    if eng.spec is None:
        return {}
    from .engine.spec_decode import spec_metrics

    m = spec_metrics(eng.scheduler)
    return {"spec_acceptance_rate": round(m["acceptance_rate"], 3),
            "spec_mean_acceptance_length": round(m["mean_acceptance_length"], 3)}


def _emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def _prompt(eng, n: int, salt: int) -> list[int]:
    # Random ordinary tokens: skip the low ids (bytes, punctuation) and the specials at the top,
    # scaled down for tiny test vocabularies.
    vocab = min(eng.model_config.vocab_size, len(eng.tokenizer) if eng.tokenizer else 10 ** 9)
    margin = min(1000, vocab // 8)
    g = torch.Generator().manual_seed(salt)
    return torch.randint(margin, max(margin + 1, vocab - margin), (n,), generator=g).tolist()


def run_latency(args: BenchConfig, eng, limits: dict) -> None:
    """Batch-1 prefill of input_len tokens, then output_len decode steps; medians of repeats."""
    wbytes, lparams = _linear_bytes_and_params(eng.loaded.model)
    pre, dec = [], []
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, repetition_penalty=1.0)
    for r in range(args.warmup + args.repeats):
        eng.block_manager.reset_prefix_cache()
        eng.add_request(f"lat{r}", None, params, prompt_token_ids=_prompt(eng, args.input_len, r),
                        output_kind=OutputKind.DELTA)  # as the server streams: no per-step history copies
        t0 = time.perf_counter()
        steps = []
        gen0 = eng.stats["generation_tokens"]
        while eng.has_unfinished_requests():
            eng.step()
            steps.append(time.perf_counter())
        # prefill may span several steps if input_len > the step budget: the first token ends it
        n_prefill = -(-args.input_len // eng.config.max_num_batched_tokens)
        t_first = steps[n_prefill - 1]
        if r >= args.warmup:
            pre.append(args.input_len / (t_first - t0))
            # tokens, not steps, after the first (a speculative step can emit several)
            dec.append((eng.stats["generation_tokens"] - gen0 - 1) / (steps[-1] - t_first))
    p, d = statistics.median(pre), statistics.median(dec)
    kv_read = eng.plan.bytes_per_token * (args.input_len + args.output_len / 2)
    gbps = (wbytes + kv_read) * d / 1e9
    gflops = 2 * lparams * p / 1e9
    base = _header(args, eng, limits)
    _emit({**base, "bench": "prefill", "batch": 1, "input_len": args.input_len, "tokens_per_s": round(p, 2),
           "gflops": sig(gflops),
           "pct_of_compute_peak": sig(100 * gflops / _peak(limits, eng.loaded.dtype))})
    _emit({**base, "bench": "decode", "batch": 1, "context": args.input_len, "output_len": args.output_len,
           "tokens_per_s": round(d, 2), "weight_gb": round(wbytes / 1e9, 3), "gbps": round(gbps, 2),
           "pct_of_mem_ceiling": sig(100 * gbps / limits["mem_read_gbps"]), **_spec_fields(eng),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)})


def run_throughput(args: BenchConfig, eng, limits: dict) -> None:
    """Aggregate generation throughput with B concurrent sequences (all admitted at once)."""
    wbytes, lparams = _linear_bytes_and_params(eng.loaded.model)
    base = _header(args, eng, limits)
    for b in args.batch_sizes:
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, repetition_penalty=1.0)
        results = []
        for r in range(max(1, args.repeats)):
            eng.block_manager.reset_prefix_cache()
            for i in range(b):
                eng.add_request(f"tp{b}-{r}-{i}", None, params, output_kind=OutputKind.DELTA,
                                prompt_token_ids=_prompt(eng, args.input_len, 7 * i + r))
            t0 = time.perf_counter()
            t_decode, produced_at = None, 0
            while eng.has_unfinished_requests():
                eng.step()
                if t_decode is None and eng.num_waiting == 0 and all(
                        s.num_computed_tokens >= s.prompt_len for s in eng.scheduler.running):
                    t_decode, produced_at = time.perf_counter(), sum(
                        s.num_output_tokens for s in eng.scheduler.running)
            t1 = time.perf_counter()
            total_out = b * args.output_len
            dec_tps = (total_out - produced_at) / (t1 - t_decode) if t_decode and t1 > t_decode else float("nan")
            results.append((total_out / (t1 - t0), dec_tps, t1 - t0))
        e2e = statistics.median(r[0] for r in results)
        dec = statistics.median(r[1] for r in results)
        gflops = 2 * lparams * dec / 1e9
        _emit({**base, "bench": "throughput", "batch": b, "input_len": args.input_len, "output_len": args.output_len,
               "output_tokens_per_s": round(e2e, 2), "decode_tokens_per_s": round(dec, 2),
               "seconds": round(statistics.median(r[2] for r in results), 2),
               "decode_gflops": sig(gflops),
               "pct_of_compute_peak": sig(100 * gflops / _peak(limits, eng.loaded.dtype)),
               "decode_weight_gbps": round(wbytes * dec / b / 1e9, 2), **_spec_fields(eng),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)})


def bench_main(args: BenchConfig) -> int:
    from .engine.llm_engine import LLMEngine

    eng = LLMEngine(args.engine, progress=sys.stderr.isatty())
    print(f"# {eng.plan.report()}; loaded in {eng.loaded.load_seconds:.1f}s", file=sys.stderr)
    limits = measure_limits(eng.loaded.device, eng.loaded.dtype)
    if args.kind == "latency":
        run_latency(args, eng, limits)
    else:
        run_throughput(args, eng, limits)
    return 0
