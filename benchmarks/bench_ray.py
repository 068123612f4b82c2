"""Ray Serve replicas vs the single-process server, on this machine.

Three servers of the same model in turn, each engine on ``--threads`` torch threads:
``single`` (``qwenrun serve``, no Ray), ``ray1`` (``--replicas 1 --ray-address local``) and ``ray2`` (``--replicas 2``,
``--replica-cpus`` = threads). For each:

- throughput: ``qwenrun bench serve``'s streaming clients at ``--concurrency`` (default 16), every
  request ``--output-len`` tokens (end of text suppressed), distinct prompts (no prefix sharing);
- routing overhead: ``--probes`` sequential one-token completions of a short prompt, after a
  warm-up; the median end-to-end latency of ``ray1`` minus ``single`` is what the Serve path
  (HTTP proxy → ingress → handle and request router → replica → back) adds to a request.

One JSON line per server, then a markdown table. The machine's model name, core count and load
average (before and after each server) are in the lines: on a shared machine, say so."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, machine, start  # noqa: E402

from qwenrun.server.bench import run_bench  # noqa: E402


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(180)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def probe(url: str, model: str, n: int) -> dict:
    """Sequential one-token requests: the per-request cost outside the engine's decode loop."""
    lat, replicas = [], set()
    with httpx.Client(timeout=120) as c:
        for i in range(n + 3):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/completions", json={"model": model, "prompt": f"probe {i % 7}", "max_tokens": 1,
                                                      "temperature": 0})
            dt = time.perf_counter() - t0
            r.raise_for_status()
            if i >= 3:  # warm-up
                lat.append(dt)
            replicas.add(r.headers.get("x-qwenrun-replica"))
    lat.sort()
    return {"probe_n": n, "probe_p50_ms": round(1000 * statistics.median(lat), 2),
            "probe_p90_ms": round(1000 * lat[int(0.9 * (len(lat) - 1))], 2),
            "probe_replicas": len(replicas - {None})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--qwenrun-args", default="-q int8 --max-model-len 2048")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (replica)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--probes", type=int, default=40)
    p.add_argument("--only", default="single,ray1,ray2")
    args = p.parse_args()
    info = machine()
    print(json.dumps({"machine": info, "args": vars(args)}), flush=True)
    logdir = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    base = [sys.executable, "-m", "qwenrun.cli", "serve", args.model, "--threads", str(args.threads),
            *args.qwenrun_args.split()]
    # --replicas 1 alone is the single-process server: --ray-address local forces Ray Serve with one replica
    variants = {"single": [], "ray1": ["--replicas", "1", "--ray-address", "local", "--replica-cpus", str(args.threads)],
                "ray2": ["--replicas", "2", "--replica-cpus", str(args.threads)]}
    rows = []
    for name in args.only.split(","):
        port = free_port()
        cmd = [*base, *variants[name], "--port", str(port)]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = start(cmd, "/health", port, logdir / f"{name}.log")
        ready_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        try:
            if name == "ray2":  # /health is 200 with one replica up: wait for both
                deadline = time.monotonic() + 600
                while httpx.get(url + "/health", timeout=10).json().get("replicas_healthy") != 2:
                    if time.monotonic() > deadline:
                        raise TimeoutError("ray2: second replica never came up")
                    time.sleep(1)
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            pr = probe(url, model, args.probes)
            (tp,) = asyncio.run(run_bench(url, model, None, [args.concurrency], args.num_requests,
                                          args.input_len, args.output_len, name))
        finally:
            rc = stop(proc)
        row = {"server": name, "ready_s": round(ready_s, 1), **pr, **{k: tp[k] for k in (
            "concurrency", "num_requests", "ok", "errors", "output_tok_s", "req_s", "ttft_p50_ms", "itl_p50_ms",
            "e2e_p50_ms", "duration_s")}, "exit_code": rc, "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {r["server"]: r for r in rows}
    print(f"# logs in {logdir}", file=sys.stderr)
    print("| server | output tok/s @%d | req/s | TTFT p50 ms | ITL p50 ms | 1-token request p50 ms | load avg (1m) |"
          % args.concurrency)
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['server']} | {r['output_tok_s']} | {r['req_s']} | {r['ttft_p50_ms']} | {r['itl_p50_ms']} | "
              f"{r['probe_p50_ms']} | {r['loadavg_before'][0]} → {r['loadavg_after'][0]} |")
    if "single" in by and "ray1" in by:
        print(f"\nrouting overhead per request (ray1 - single, 1-token p50): "
              f"{by['ray1']['probe_p50_ms'] - by['single']['probe_p50_ms']:.2f} ms")
    if "ray1" in by and "ray2" in by:
        print(f"2 replicas / 1 replica throughput: {by['ray2']['output_tok_s'] / by['ray1']['output_tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
