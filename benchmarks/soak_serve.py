"""Soak benchmark: many concurrent streams against ``qwenrun serve`` for minutes, then the books.

Starts ``qwenrun serve MODEL`` (or uses --url), runs --streams concurrent streaming chat clients
for --seconds (each sends a request, reads it to the end, sends the next; a share of them hang up
mid-answer on purpose), then waits for the server to go idle and reports: requests, errors
(non-2xx, error events, broken streams), leaked KV blocks (blocks still in use once idle), server
RSS after warm-up and at the end, and p50/p99 time to first token and inter-token latency.
One JSON line on stdout.

    .venv/bin/python benchmarks/soak_serve.py demo --streams 64 --seconds 600
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, machine, start  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash map is.", "def quicksort(xs):",
           "List three uses of Python decorators.", "What is the capital of France?",
           "Summarize the plot of Hamlet in two sentences."]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("qwenrun:") and " " in line:
            name, val = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(val)
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)  # ms


async def client(url: str, until: float, rng: random.Random, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < until:
            body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                    "max_tokens": rng.randint(16, 128), "temperature": 0.8}
            hang_up_after = rng.randint(1, 20) if rng.random() < 0.1 else None  # 10% leave mid-answer
            t0 = time.perf_counter()
            last, n = None, 0
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["errors"] += 1
                        stats["error_kinds"][str(r.status_code)] = stats["error_kinds"].get(str(r.status_code), 0) + 1
                        await r.aread()
                        continue
                    done = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        ev = json.loads(data)
                        if "error" in ev:
                            stats["errors"] += 1
                            stats["error_kinds"]["event"] = stats["error_kinds"].get("event", 0) + 1
                            break
                        if any(ch["delta"].get("content") for ch in ev["choices"]):
                            now = time.perf_counter()
                            if last is None:
                                stats["ttft"].append(now - t0)
                            else:
                                stats["itl"].append(now - last)
                            last, n = now, n + 1
                            if hang_up_after is not None and n >= hang_up_after:
                                stats["hung_up"] += 1
                                break
                    if done:
                        stats["completed"] += 1
                    stats["tokens"] += n
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                stats["errors"] += 1
                stats["error_kinds"][type(e).__name__] = stats["error_kinds"].get(type(e).__name__, 0) + 1
            stats["requests"] += 1


async def sample_rss(pid: int | None, until: float, every: float, out: list) -> None:
    """Server RSS (MiB) every ``every`` seconds: a leak climbs after the plateau, a warm-up does not."""
    while pid is not None and time.monotonic() < until:
        out.append(round(rss(pid) / 2**20, 1))
        await asyncio.sleep(every)


async def soak(url: str, streams: int, seconds: float, seed: int, pid: int | None = None) -> dict:
    stats = {"requests": 0, "completed": 0, "hung_up": 0, "errors": 0, "error_kinds": {}, "tokens": 0,
             "ttft": [], "itl": [], "rss": []}
    until = time.monotonic() + seconds
    await asyncio.gather(sample_rss(pid, until, max(1.0, seconds / 20), stats["rss"]),
                         *(client(url, until, random.Random(seed * 1000 + i), stats) for i in range(streams)))
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--url", default=None, help="soak a running server instead of starting one")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="--max-model-len 2048 --kv-cache-memory 1 --max-num-seqs 64")
    args = ap.parse_args()
    proc = None
    if args.url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path("/tmp") / f"soak-serve-{port}.log"
        proc = start([sys.executable, "-m", "qwenrun.cli", "serve", args.model, "--port", str(port),
                      *args.serve_args.split()], "/health", port, log)
    else:
        url = args.url
    try:
        asyncio.run(soak(url, min(args.streams, 8), args.warmup, args.seed + 1))  # warm-up: allocator, caches
        rss_start = rss(proc.pid) if proc else None
        t0 = time.monotonic()
        st = asyncio.run(soak(url, args.streams, args.seconds, args.seed, proc.pid if proc else None))
        wall = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while True:  # wait for the server to go idle: aborts of hung-up streams land, blocks return
            m = metrics(url)
            if m.get("qwenrun:num_requests_running") == 0 and m.get("qwenrun:num_requests_waiting") == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rss_end = rss(proc.pid) if proc else None
        health = httpx.get(url + "/health", timeout=10).status_code
        rec = {"bench": "soak_serve", **machine(), "model": args.model, "streams": args.streams,
               "seconds": round(wall, 1), "requests": st["requests"], "completed": st["completed"],
               "hung_up_on_purpose": st["hung_up"], "errors": st["errors"], "error_kinds": st["error_kinds"],
               "tokens_streamed": st["tokens"], "tokens_per_s": round(st["tokens"] / wall, 1),
               "kv_blocks_in_use_when_idle": m.get("qwenrun:kv_cache_used_blocks"),
               "kv_usage_when_idle": m.get("qwenrun:kv_cache_usage_perc"),
               "rss_mib_after_warmup": round(rss_start / 2**20, 1) if rss_start else None,
               "rss_mib_end": round(rss_end / 2**20, 1) if rss_end else None,
               "rss_mib_timeline": st["rss"],  # every seconds/20 during the run
               "ttft_ms_p50": pct(st["ttft"], 0.5), "ttft_ms_p99": pct(st["ttft"], 0.99),
               "itl_ms_p50": pct(st["itl"], 0.5), "itl_ms_p99": pct(st["itl"], 0.99),
               "itl_ms_mean": round(statistics.fmean(st["itl"]) * 1000, 1) if st["itl"] else None,
               "health_after": health, "requests_failed_in_engine": m.get("qwenrun:requests_failed_total")}
        print(json.dumps(rec))
        return 0 if st["errors"] == 0 and health == 200 and not rec["kv_blocks_in_use_when_idle"] else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
