#!/usr/bin/env python
"""qwenrun vs llama.cpp (llama-cpp-python) vs HF transformers on the same GGUF, in one run.

Measures, one engine at a time (never concurrently: 2 cores): prefill tokens/s of a PROMPT_LEN-token
prompt, single-stream decode tokens/s, and qwenrun's aggregate decode over 16 concurrent
sequences; plus the machine's memory-read ceiling and compute peaks (fp32 and bf16 matmul), so every figure is also a
fraction of the limit that binds it. Prints one JSON line per result and a ratio table.

    .venv/bin/python benchmarks/bench_cpu.py [--model demo] [--quant none,int8,int4] [--peers llama.cpp,transformers]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch


def med(xs):
    return statistics.median(xs)


def bench_qwenrun(model: str, quant: str | None, prompt: list[int], decode_len: int, conc: int, repeats: int):
    from qwenrun.bench import _linear_bytes_and_params
    from qwenrun.config import EngineConfig
    from qwenrun.engine.llm_engine import LLMEngine
    from qwenrun.outputs import OutputKind
    from qwenrun.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=model, quantization=quant, kv_cache_memory=1.0, max_model_len=4096,
                                 max_num_batched_tokens=len(prompt)), progress=False)
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
        eng.step()  # all 16 prompts prefill together
        t0 = time.perf_counter()
        n0 = sum(s.num_output_tokens for s in eng.scheduler.running)
        while eng.has_unfinished_requests():
            eng.step()
        agg.append((conc * decode_len - n0) / (time.perf_counter() - t0))
    res = {"engine": "qwenrun", "quant": quant or "fp32", "act_dtype": str(eng.loaded.dtype).replace("torch.", ""),
           "prefill_tps": med(pre), "decode_tps": med(dec),
           f"aggregate{conc}_tps": med(agg), "weight_gb": wbytes / 1e9, "linear_params": lparams}
    del eng
    gc.collect()
    return res


def bench_llamacpp(path: str, prompt: list[int], decode_len: int, repeats: int, threads: int):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                n_batch=len(prompt), verbose=False)
    pre, dec = [], []
    for r in range(repeats + 1):
        llm.reset()
        toks = [t + r for t in prompt]
        t0 = time.perf_counter()
        llm.eval(toks)
        t1 = time.perf_counter()
        for _ in range(decode_len):  # greedy: argmax of the last logits, as llama.cpp's sampler reads them
            nxt = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            llm.eval([nxt])
        t2 = time.perf_counter()
        if r:
            pre.append(len(prompt) / (t1 - t0))
            dec.append(decode_len / (t2 - t1))
    del llm
    gc.collect()
    # Bytes a decode step reads: every tensor but the token embedding (only one row of it is read),
    # unless the head is tied to it (then the whole table is read by the head).
    from gguf import GGUFReader

    names = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in names
    wb = sum(b for n, b in names.items() if n != "token_embd.weight" or tied)
    return {"engine": "llama.cpp", "quant": "Q4_K_M (gguf)", "act_dtype": "q8 (int8 dot products)",
            "prefill_tps": med(pre), "decode_tps": med(dec), "weight_gb": wb / 1e9}


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
    ap.add_argument("--quant", default="none,int8,int4")
    ap.add_argument("--peers", default="llama.cpp,transformers")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from qwenrun.bench import measure_limits, peak_key
    from qwenrun.loader import resolve

    threads = torch.get_num_threads()
    gguf = str(resolve(args.model).path)
    prompt = torch.randint(1000, 100000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    limits = measure_limits(torch.device("cpu"), torch.bfloat16)
    print(json.dumps({"limits": limits, "threads": threads}), flush=True)
    results = []
    for q in args.quant.split(","):
        r = bench_qwenrun(args.model, None if q == "none" else q, prompt, args.decode_len, args.concurrency,
                          args.repeats)
        results.append(r)
        print(json.dumps(r), flush=True)
    peers = [p for p in args.peers.split(",") if p]
    if "llama.cpp" in peers:
        results.append(bench_llamacpp(gguf, prompt, args.decode_len, args.repeats, threads))
        print(json.dumps(results[-1]), flush=True)
    if "transformers" in peers:
        results.append(bench_transformers(gguf, prompt, args.decode_len, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    limits2 = measure_limits(torch.device("cpu"), torch.bfloat16)  # again at the end: was the machine quiet throughout?
    print(json.dumps({"limits_end": limits2}), flush=True)
    base = next((r for r in results if r["engine"] == "llama.cpp"), None)
    # The binding limits, from both measurements (the median of two = their mean).
    ceiling = statistics.median([limits["mem_read_gbps"], limits2["mem_read_gbps"]])
    peaks = {str(dt).removeprefix("torch."): statistics.median([limits[peak_key(dt)], limits2[peak_key(dt)]])
             for dt in (torch.float32, torch.bfloat16)}
    lparams = next((r["linear_params"] for r in results if "linear_params" in r), None)
    print(f"\nlimits (median of start and end): memory read {ceiling:.1f} GB/s, fp32 {peaks['float32']:.0f} GFLOP/s, "
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
        print(f"{r['engine']:14} {r['quant']:24} {r['prefill_tps']:14.1f} {r['decode_tps']:13.2f} {ratio:>22} {gbps:>24} {pre:>25}")
        if f"aggregate{args.concurrency}_tps" in r:
            agg = r[f"aggregate{args.concurrency}_tps"]
            rel = f" = {agg / base['decode_tps']:.2f}x llama.cpp single stream" if base else ""
            print(f"{'':14} aggregate decode over {args.concurrency} sequences: {agg:.1f} tok/s{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
