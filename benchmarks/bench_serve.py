"""Serving benchmark: ``qwenrun serve demo`` vs llama-cpp-python's server on the same GGUF.

One invocation starts each server in turn (never both at once: the CPU is shared), runs
``qwenrun.server.bench`` against it at each concurrency, stops it, and prints one JSON line per
result plus a side-by-side table with qwenrun/llama.cpp ratios. llama-cpp-python is a benchmark
peer only (``pip install llama-cpp-python starlette-context pydantic-settings``), never a
qwenrun dependency.

    .venv/bin/python benchmarks/bench_serve.py --concurrency 1,4,16 --input-len 128 --output-len 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from qwenrun.loader.demo import demo_gguf_path
from qwenrun.server.bench import parse_concurrency, run_bench

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "commit": commit}


def start(cmd: list[str], ready_path: str, port: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{cmd[:4]} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_quiet(max_wait: float, threshold: float = 1.0) -> float:
    """The machine may be shared: wait (at most max_wait s) for the 1-minute load to settle."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run_server(name: str, cmd: list[str], ready: str, port: int, args, logdir: Path) -> list[dict]:
    load = wait_for_quiet(args.quiet_wait)
    print(f"# {name}: {' '.join(cmd)} (1-min load before start: {load:.2f})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = start(cmd, ready, port, logdir / f"{name}.log")
    print(f"# {name} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    try:
        return asyncio.run(run_bench(f"http://127.0.0.1:{port}", None, None, parse_concurrency(args.concurrency),
                                     args.num_requests, args.input_len, args.output_len, name))
    finally:
        stop(proc)


def table(q: list[dict], l: list[dict]) -> str:
    cols = [("output_tok_s", "out tok/s", True), ("req_s", "req/s", True), ("ttft_p50_ms", "TTFT p50 ms", False),
            ("ttft_p90_ms", "TTFT p90", False), ("itl_p50_ms", "ITL p50 ms", False), ("itl_p90_ms", "ITL p90", False),
            ("e2e_p50_ms", "E2E p50 ms", False), ("e2e_p99_ms", "E2E p99", False)]
    # One ratio column: above 1 is better for qwenrun on throughput rows, worse on latency rows.
    lines = ["| conc | metric | qwenrun | llama.cpp | qwenrun / llama.cpp |", "|---:|---|---:|---:|---:|"]
    by_c = {r["concurrency"]: r for r in l}
    for qr in q:
        lr = by_c.get(qr["concurrency"], {})
        for key, title, higher in cols:
            a, b = qr.get(key), lr.get(key)
            ratio = f"{a / b:.2f}x" if a and b else "-"
            hint = " (higher is better)" if higher else " (lower is better)"
            lines.append(f"| {qr['concurrency']} | {title}{hint} | {a} | {b if b is not None else '-'} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-requests", type=int, default=None, help="per level (default: 2 per client)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both servers")
    p.add_argument("--ctx", type=int, default=2048, help="context of both servers")
    p.add_argument("--qwenrun-args", default="", help="extra flags for qwenrun serve (e.g. '-q int8')")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="seconds to wait for a 1-min load average <= 1 before each server (shared machines)")
    args = p.parse_args()
    gguf = str(demo_gguf_path())
    info = machine()
    print(json.dumps({"machine": info, "gguf": gguf, "args": vars(args)}), flush=True)
    logdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))

    port = free_port()
    q_cmd = [sys.executable, "-m", "qwenrun.cli", "serve", "demo", "--port", str(port), "--threads", str(args.threads),
             "--max-model-len", str(args.ctx), *args.qwenrun_args.split()]
    q_rows = run_server("qwenrun", q_cmd, "/health", port, args, logdir)

    l_rows: list[dict] = []
    if not args.skip_llama:
        port = free_port()
        # n_threads = n_threads_batch = 2: the same cores as qwenrun. llama-cpp-python's server runs
        # one completion at a time (a global lock), so concurrent clients queue there; by default it
        # *cancels* the running completion when another arrives (interrupt_requests), which would
        # make short, fast-looking answers: turned off so every request gets its tokens.
        l_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(args.threads),
                 "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx), "--port", str(port),
                 "--model_alias", "demo", "--verbose", "False", "--interrupt_requests", "False"]
        l_rows = run_server("llama.cpp", l_cmd, "/v1/models", port, args, logdir)
    print(f"# logs in {logdir}; load average at the end: {os.getloadavg()}", file=sys.stderr)
    print(table(q_rows, l_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
