#!/usr/bin/env python
"""qwenrun vs llama.cpp (built for this CPU) vs HF transformers on the same GGUF, in one run.

Measures, one engine at a time (never concurrently: 2 cores): prefill tokens/s of a PROMPT_LEN-token
prompt, single-stream decode tokens/s, qwenrun's aggregate decode over 16 concurrent sequences,
and (each in a fresh process) load time and peak RSS; plus the machine's memory-read ceiling and
compute peaks (fp32 and bf16 matmul) at the start and the end, so every figure is also a fraction
of the limit that binds it. The llama.cpp peer runs in its own venv, llama-cpp-python compiled
for this CPU (benchmarks/peer_llamacpp.sh builds it once, cached by the CPU's flags). Prints the
CPU, one JSON line per result and a ratio table.

    .venv/bin/python benchmarks/bench_cpu.py [--model demo|FILE.gguf] [--quant auto,int8,int4,none]
                                             [--peers llama.cpp,transformers] [--peer-python PY]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def med(xs):
    return statistics.median(xs)


def bench_qwenrun(model: str, quant: str | None, prompt: list[int], decode_len: int, conc: int, repeats: int,
                  max_model_len: int = 4096, kv_cache_dtype: str = "auto"):
    """Prefill, decode and aggregate decode of one qwenrun configuration (this process)."""
    from qwenrun.bench import _linear_bytes_and_params
    from qwenrun.config import EngineConfig
    from qwenrun.engine.llm_engine import LLMEngine
    from qwenrun.outputs import OutputKind
    from qwenrun.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=model, quantization=quant, kv_cache_memory=1.0, max_model_len=max_model_len,
                                 max_num_batched_tokens=len(prompt), kv_cache_dtype=kv_cache_dtype), progress=False)
    wbytes, lparams = _linear_bytes_and_params(eng.loaded.model)
    sp = SamplingParams(temperature=0, max_tokens=decode_len, ignore_eos=True, repetition_penalty=1.0)
    pre, dec = [], []
    for r in range(repeats + 1):
        eng.block_manager.reset_prefix_cache()
        eng.add_request(f"s{r}", None, sp, prompt_token_ids=[t + r for t in prompt], output_kind=OutputKind.DELTA)
        t0 = time.perf_counter()
        eng.step()
        t1 = time.perf_counter()
        n = 0
        while eng.has_unfinished_requests():
            eng.step()
            n += 1
        t2 = time.perf_counter()
        if r:
            pre.append(len(prompt) / (t1 - t0))
            dec.append(n / (t2 - t1))
    agg = []
    short = prompt[:32]
    for r in range(repeats):
        for i in range(conc):
            eng.add_request(f"c{r}-{i}", None, sp, prompt_token_ids=[t + i + 100 * r for t in short],
                            output_kind=OutputKind.DELTA)
        # prefill every prompt first (max_num_batched_tokens may take several steps), so the timed
        # part is decoding only
        eng.step()
        while eng.scheduler.waiting or any(s.num_output_tokens == 0 for s in eng.scheduler.running):
            eng.step()
        t0 = time.perf_counter()
        n0 = sum(s.num_output_tokens for s in eng.scheduler.running)
        while eng.has_unfinished_requests():
            eng.step()
        agg.append((conc * decode_len - n0) / (time.perf_counter() - t0))
    res = {"engine": "qwenrun", "quant": eng.loaded.quantization or "none (dense)", "act_dtype": str(eng.loaded.dtype).replace("torch.", ""),
           "kv_cache_dtype": str(eng.cache.dtype).replace("torch.", ""),
           "prefill_tps": med(pre), "decode_tps": med(dec),
           f"aggregate{conc}_tps": med(agg), "weight_gb": wbytes / 1e9, "linear_params": lparams}
    del eng
    gc.collect()
    return res


def bench_llamacpp(py: str, path: str, prompt: list[int], decode_len: int, repeats: int, threads: int):
    """llama.cpp through benchmarks/llamacpp_peer.py in the peer venv (its own process)."""
    cmd = [py, str(Path(__file__).parent / "llamacpp_peer.py"), path, "--prompt", ",".join(map(str, prompt)),
           "--decode-len", str(decode_len), "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
from qwenrun.config import EngineConfig
from qwenrun.loader import load
from qwenrun.quant import quantizer_for
cfg = EngineConfig(model=sys.argv[1], quantization=None if sys.argv[2] == "none" else sys.argv[2])
lm = load(cfg, progress=False, on_linear=quantizer_for(cfg))
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM"))  # this process only
print(json.dumps({"load_s": time.perf_counter() - t0, "load_peak_rss_gb": hwm * 1024 / 1e9,
                  "weights_gb": lm.weight_bytes / 1e9, "quant": lm.quantization}))
"""


def bench_load(model: str, quant: str) -> dict:
    """Load time (warm page cache: the file was read before) and peak RSS, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", LOAD, model, quant], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_info() -> dict:
    """The CPU model and the ISA extensions that decide which kernels can run."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                fields.setdefault(key.strip(), val.strip())
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    isa = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                       "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16") if x in flags]
    return {"cpu": fields.get("model name", platform.processor()), "family": fields.get("cpu family"),
            "model": fields.get("model"), "isa": isa, "cores": os.cpu_count()}


def peer_python(arg: str | None) -> str:
    if arg:
        return arg
    script = Path(__file__).parent / "peer_llamacpp.sh"
    return subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout.strip()


def bench_transformers(path, prompt: list[int], decode_len: int, repeats: int):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            ids = torch.tensor([[t + r for t in prompt]])
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(decode_len):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if r:
                pre.append(len(prompt) / (t1 - t0))
                dec.append(decode_len / (t2 - t1))
    wb = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    del model, out, past
    gc.collect()
    return {"engine": "transformers", "quant": "fp32 (dequantized gguf)", "act_dtype": "float32",
            "prefill_tps": med(pre), "decode_tps": med(dec), "weight_gb": wb / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--quant", default="auto,int8,int4", help="qwenrun weight modes, comma-separated")
    ap.add_argument("--peers", default="llama.cpp,transformers")
    ap.add_argument("--peer-python", default=None, help="python with llama-cpp-python (default: built natively)")
    ap.add_argument("--no-load", action="store_true", help="skip the load-time / peak-RSS measurements")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=4096, help="qwenrun's context (KV pool of 1 GiB)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="qwenrun's KV cache (auto = the activations'; llama.cpp's default is float16)")
    args = ap.parse_args()
    from qwenrun.bench import measure_limits, peak_key
    from qwenrun.loader import resolve

    threads = torch.get_num_threads()
    gguf = str(resolve(args.model).path)
    prompt = torch.randint(1000, 100000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    peers = [p for p in args.peers.split(",") if p]
    py = peer_python(args.peer_python) if "llama.cpp" in peers else None
    info = cpu_info()
    from qwenrun.quant import kernels

    info["qwenrun_kernels"] = kernels.describe()
    print(json.dumps({"machine": info, "load_avg": os.getloadavg()}), flush=True)
    from qwenrun.loader import cpu_has_fast_bf16

    # the bf16 matmul peak only where bf16 is native (elsewhere a 2048^3 bf16 matmul takes ~50 s and
    # nothing runs bf16 GEMMs): then the bf16 figures below are given against the fp32 peak
    act = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    limits = measure_limits(torch.device("cpu"), act)
    print(json.dumps({"limits": limits, "threads": threads}), flush=True)
    results = []
    for q in args.quant.split(","):
        r = bench_qwenrun(args.model, None if q == "none" else q, prompt, args.decode_len, args.concurrency,
                          args.repeats, args.max_model_len, args.kv_cache_dtype)
        if not args.no_load:
            r.update(bench_load(args.model, q))
        results.append(r)
        print(json.dumps(r), flush=True)
    if "llama.cpp" in peers:
        results.append(bench_llamacpp(py, gguf, prompt, args.decode_len, args.repeats, threads))
        print(json.dumps(results[-1]), flush=True)
    if "transformers" in peers:
        results.append(bench_transformers(gguf, prompt, args.decode_len, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    limits2 = measure_limits(torch.device("cpu"), act)  # again at the end: was the machine quiet throughout?
    print(json.dumps({"limits_end": limits2}), flush=True)
    base = next((r for r in results if r["engine"] == "llama.cpp"), None)
    # The binding limits, from both measurements (the median of two = their mean).
    ceiling = statistics.median([limits["mem_read_gbps"], limits2["mem_read_gbps"]])
    peaks = {str(dt).removeprefix("torch."): statistics.median([limits[peak_key(dt)], limits2[peak_key(dt)]])
             for dt in dict.fromkeys((torch.float32, act))}
    peaks.setdefault("bfloat16", peaks["float32"])
    lparams = next((r["linear_params"] for r in results if "linear_params" in r), None)
    print(f"\n{info['cpu']} ({', '.join(info['isa'])}); qwenrun kernels: {info['qwenrun_kernels']}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    if base:
        print(f"llama.cpp {base.get('llama_cpp_version')}: {base.get('system_info')}")
    print(f"limits (median of start and end): memory read {ceiling:.1f} GB/s, fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s; {threads} threads")
    print(f"\n{'engine':14} {'weights':24} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'x llama.cpp (pre/dec)':>22} {'decode GB/s (% ceiling)':>24} {'prefill GFLOP/s (% peak)':>25}")
    for r in results:
        ratio = (f"{r['prefill_tps'] / base['prefill_tps']:.2f} / {r['decode_tps'] / base['decode_tps']:.2f}"
                 if base else "-")
        gbps = (f"{r['weight_gb'] * r['decode_tps']:.1f} ({100 * r['weight_gb'] * r['decode_tps'] / ceiling:.0f}%)"
                if "weight_gb" in r else "-")
        # Prefill FLOPs: 2 per linear weight per token (attention adds ~3% at 512 tokens). llama.cpp's
        # int8 dot products have no measured peak here: its share is given against the bf16 peak.
        gf = 2 * lparams * r["prefill_tps"] / 1e9 if lparams else 0
        peak = peaks.get(r["act_dtype"], peaks["bfloat16"])
        pre = f"{gf:.0f} ({100 * gf / peak:.0f}% {'fp32' if peak == peaks['float32'] else 'bf16'})" if gf else "-"
        print(f"{r['engine']:14} {r['quant'][:24]:24} {r['prefill_tps']:14.1f} {r['decode_tps']:13.2f} {ratio:>22} {gbps:>24} {pre:>25}")
        if "load_s" in r:
            print(f"{'':14} load {r['load_s']:.1f} s, peak RSS {r['load_peak_rss_gb']:.2f} GB")
        if f"aggregate{args.concurrency}_tps" in r:
            agg = r[f"aggregate{args.concurrency}_tps"]
            rel = f" = {agg / base['decode_tps']:.2f}x llama.cpp single stream" if base else ""
            print(f"{'':14} aggregate decode over {args.concurrency} sequences: {agg:.1f} tok/s{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
