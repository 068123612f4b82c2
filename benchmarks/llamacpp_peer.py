#!/usr/bin/env python
"""The llama.cpp side of benchmarks/bench_cpu.py, run by the benchmark venv's python (llama-cpp-python
built for this CPU, benchmarks/peer_llamacpp.sh): prefill and greedy decode speed on a GGUF, and
the file's bytes read per decoded token. Prints one JSON line. Needs only llama_cpp, numpy, gguf.

    PY benchmarks/llamacpp_peer.py FILE.gguf --prompt 1,2,3,... --decode-len 64 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader
    from llama_cpp import Llama

    prompt = [int(t) for t in args.prompt.split(",")]
    t0 = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                n_batch=len(prompt), verbose=False)
    load_s = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (kept across fork + exec)
    load_rss = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) * 1024
    pre, dec = [], []
    for r in range(args.repeats + 1):
        llm.reset()
        toks = [t + r for t in prompt]
        t0 = time.perf_counter()
        llm.eval(toks)
        t1 = time.perf_counter()
        for _ in range(args.decode_len):  # greedy: argmax of the last logits
            nxt = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            llm.eval([nxt])
        t2 = time.perf_counter()
        if r:
            pre.append(len(prompt) / (t1 - t0))
            dec.append(args.decode_len / (t2 - t1))
    # Bytes a decode step reads: every tensor but the token embedding (one row of it is read),
    # unless the head is tied to it (then the head reads the whole table).
    tensors = GGUFReader(args.gguf).tensors
    names = {t.name: int(t.n_bytes) for t in tensors}
    kinds = sorted({t.tensor_type.name for t in tensors if len(t.shape) == 2})
    tied = "output.weight" not in names
    wb = sum(b for n, b in names.items() if n != "token_embd.weight" or tied)
    print(json.dumps({
        "engine": "llama.cpp", "quant": "gguf:" + ",".join(kinds), "act_dtype": "q8 (int8 dot products)",
        "prefill_tps": statistics.median(pre), "decode_tps": statistics.median(dec), "weight_gb": wb / 1e9,
        "load_s": load_s, "load_peak_rss_gb": load_rss / 1e9, "llama_cpp_version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
