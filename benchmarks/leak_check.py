"""Leak check for the engine + AsyncLLM path: thousands of requests (10% abandoned early) on a tiny
random checkpoint, with traced Python memory and RSS printed after each thousand, then the
tracemalloc lines that grew most. Bounded caches (prefix-cache entries) may grow; nothing per
request may stay.

    .venv/bin/python benchmarks/leak_check.py
"""
import asyncio, gc, sys, tempfile, tracemalloc, random
from pathlib import Path

import torch
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import write_tiny_checkpoint  # noqa: E402
from qwenrun.config import EngineConfig
from qwenrun.engine.async_engine import AsyncLLM
from qwenrun.engine.llm_engine import LLMEngine
from qwenrun.sampling_params import SamplingParams
ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", max_pos=4096)
eng = LLMEngine(EngineConfig(model=str(ckpt), max_model_len=1024, kv_cache_memory=0.2), progress=False)
llm = AsyncLLM(eng)
async def one(i):
    p = SamplingParams(max_tokens=random.randint(8, 40), temperature=0.8, ignore_eos=True)
    gen = llm.generate(None, p, f"r{i}", prompt_token_ids=[5 + i % 50] * 20)
    try:
        n = 0
        async for out in gen:
            n += 1
            if i % 10 == 0 and n > 3: break
    finally:
        await gen.aclose()
async def batch(k0, k):
    sem = asyncio.Semaphore(32)
    async def lim(i):
        async with sem: await one(i)
    await asyncio.gather(*(lim(i) for i in range(k0, k0 + k)))
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
asyncio.run(batch(0, 500)); gc.collect()
tracemalloc.start(10)
s1 = tracemalloc.take_snapshot(); r1 = rss()
for j in range(4):
    asyncio.run(batch(1000 + j * 1000, 1000)); gc.collect()
    print("after", (j + 1) * 1000, "rss MiB", rss(), "traced MiB", round(tracemalloc.get_traced_memory()[0] / 2**20, 2), flush=True)
s2 = tracemalloc.take_snapshot()
for st in s2.compare_to(s1, "lineno")[:8]: print(st)
llm.shutdown()
