"""``qwenrun bench serve``: load-test any OpenAI-compatible server with streaming clients.

At each concurrency C, C asyncio clients pull from a shared list of requests (``--num-requests``,
default 2 per client) and stream /v1/completions with ~``--input-len`` prompt tokens and
``max_tokens=--output-len``. End of text is suppressed (``ignore_eos`` where the server knows it,
and a -100 logit bias on Qwen's end tokens for those that do not), so every request produces the
same number of tokens on every server. Per request: TTFT (send → first text), inter-token
latency (gaps between text events), end-to-end latency. One JSON line per concurrency."""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..settings import ServeBenchConfig

# Qwen2 vocabulary: <|endoftext|>, <|im_end|> (the same ids in Qwen1.5, Qwen2 and Qwen2.5).
QWEN_END_TOKENS = (151643, 151645)
# Common words that are one token each (with their leading space) in byte-level BPE vocabularies.
_WORDS = ("the of and to in is was for on that with as by at from his her they have this which one had "
          "not but are were all been when there she can an would who will more if no out so said what up "
          "its about into than them only other time new some could these two may first then do any like "
          "my now over such our man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good "
          "very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used "
          "take three").split()


def make_prompt(i: int, input_len: int, seed: int = 0) -> str:
    """~input_len tokens of distinct text per request (no shared prefix beyond a few tokens, so
    neither server wins by prefix caching)."""
    rng = random.Random(seed * 1_000_003 + i)
    return f"Request {i}:" + "".join(" " + rng.choice(_WORDS) for _ in range(max(1, input_len - 4)))


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str = ""


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    itls: list[float] = []
    events = 0
    usage = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                if not any(c.get("text") for c in chunk.get("choices") or ()):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
                events += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(False, error=repr(e))
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no text streamed")
    # Token count: the server's usage when it streams one, else one token per text event.
    n_out = usage["completion_tokens"] if usage and usage.get("completion_tokens") else events
    return RequestResult(True, ttft=first - t0, e2e=end - t0, itls=itls, output_tokens=n_out,
                         prompt_tokens=usage.get("prompt_tokens") if usage else None)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def run_level(url: str, model: str, api_key: str | None, concurrency: int, num_requests: int,
                    input_len: int, output_len: int, seed: int = 0, eos_bias: bool = True) -> dict[str, Any]:
    body_base = {"model": model, "max_tokens": output_len, "stream": True, "temperature": 0,
                 "ignore_eos": True, "stream_options": {"include_usage": True}}
    if eos_bias:
        body_base["logit_bias"] = {str(t): -100 for t in QWEN_END_TOKENS}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    todo = list(range(num_requests))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), headers=headers, limits=limits) as client:

        async def worker() -> None:
            while todo:
                i = todo.pop()
                results.append(await _one(client, url.rstrip("/") + "/v1/completions",
                                          {**body_base, "prompt": make_prompt(i, input_len, seed)}))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    row: dict[str, Any] = {"concurrency": concurrency, "num_requests": num_requests, "ok": len(ok),
                           "errors": len(results) - len(ok), "input_len": input_len, "output_len": output_len,
                           "duration_s": round(wall, 3), "output_tok_s": round(out_tokens / wall, 3),
                           "req_s": round(len(ok) / wall, 4), "mean_output_tokens": round(out_tokens / max(1, len(ok)), 1),
                           # requests that ended before output_len (a server that stopped early)
                           "short_requests": sum(1 for r in ok if r.output_tokens < output_len)}
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    row["mean_prompt_tokens"] = round(statistics.mean(prompt), 1) if prompt else None
    for name, vals in (("ttft", [r.ttft for r in ok]), ("itl", itls), ("e2e", [r.e2e for r in ok])):
        for q in (50, 90, 99):
            v = _pct(vals, q)
            row[f"{name}_p{q}_ms"] = round(v * 1000, 1) if v is not None else None
    if len(results) > len(ok):
        row["first_error"] = next(r.error for r in results if not r.ok)
    return row


def first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_bench(url: str, model: str | None, api_key: str | None, concurrencies: list[int],
                    num_requests: int | None, input_len: int, output_len: int,
                    label: str) -> list[dict[str, Any]]:
    model = model or first_model(url, api_key)
    # The warm-up (first-request costs are not serving speed) also tells whether the server takes
    # the Qwen end-token bias: a model with another vocabulary rejects those ids with a 400.
    warm = await run_level(url, model, api_key, 1, 1, min(input_len, 16), 4, seed=-1)
    eos_bias = warm["ok"] == 1 or "HTTP 400" not in warm.get("first_error", "")
    rows = []
    for c in concurrencies:
        load0 = os.getloadavg()[0]
        row = {"label": label, "url": url, "model": model, "eos_bias": eos_bias,
               **await run_level(url, model, api_key, c, num_requests or 2 * c, input_len, output_len,
                                 eos_bias=eos_bias)}
        # This machine's 1-minute load average around the level: when the server runs here too,
        # a value above the core count means the numbers were taken on a busy machine.
        row["client_loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse_concurrency(spec: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be a comma-separated list of integers, got {spec!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--concurrency values must be >= 1, got {spec!r}")
    return values


def bench_serve_main(args: ServeBenchConfig) -> int:
    try:
        asyncio.run(run_bench(args.url, args.model, args.api_key, args.concurrency, args.num_requests, args.input_len,
                              args.output_len, args.label))
    except httpx.HTTPError as e:
        print(f"qwenrun: error: cannot benchmark {args.url}: {e}", file=sys.stderr)
        return 2
    return 0
