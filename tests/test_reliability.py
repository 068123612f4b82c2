"""The engine under faults, in-process and deterministic: cancelled commands, failing steps and
failing requests, delta outputs and their coalescing, decode batches split by the memory plan.
(The server-level versions — disconnect storms, slow readers, hostile input — are in
test_server_faults.py.)"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qwenrun.config import EngineConfig
from qwenrun.engine.async_engine import AsyncLLM, EngineDeadError
from qwenrun.engine.llm_engine import LLMEngine
from qwenrun.errors import RequestFailedError
from qwenrun.outputs import OutputKind
from qwenrun.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True, repetition_penalty=1.0)


def _engine(tiny_dir, **kw) -> LLMEngine:
    kw = {"max_model_len": 256, "kv_cache_memory": 0.01, **kw}
    return LLMEngine(EngineConfig(model=str(tiny_dir), **kw), progress=False)


async def _collect(gen):
    acc = None
    async for out in gen:
        if acc is None:
            acc = out
        else:
            acc.add(out)
    return acc


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def _no_blocks_held(eng: LLMEngine) -> bool:
    return eng.block_manager.num_free_blocks == eng.block_manager.num_blocks and not eng.requests


# -- 1. cancellation-safe commands ---------------------------------------------------------------
def test_add_cancelled_while_queued_behind_a_long_step(tiny_dir):
    """The issue's crash: an add whose caller is cancelled while it waits behind a model step."""
    eng = _engine(tiny_dir)
    gate, entered, first = threading.Event(), threading.Event(), [True]
    real = eng.runner.execute

    def slow_once(sched):
        if first[0]:
            first[0] = False
            entered.set()
            assert gate.wait(30)
        return real(sched)

    eng.runner.execute = slow_once
    llm = AsyncLLM(eng)

    async def main():
        a = asyncio.create_task(_collect(llm.generate(None, SamplingParams(max_tokens=6, **GREEDY), "a",
                                                      prompt_token_ids=[1, 2, 3])))
        await asyncio.to_thread(entered.wait, 30)  # the engine thread is inside a step now
        b = asyncio.create_task(_collect(llm.generate(None, SamplingParams(max_tokens=6, **GREEDY), "b",
                                                      prompt_token_ids=[4, 5, 6])))
        while llm._cmds.qsize() == 0:  # b's add command is queued behind the step
            await asyncio.sleep(0.001)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        gate.set()
        out_a = await a
        assert out_a.finished and len(out_a.outputs[0].token_ids) == 6
        # the engine still serves, and b was never added
        out_c = await _collect(llm.generate(None, SamplingParams(max_tokens=3, **GREEDY), "c",
                                            prompt_token_ids=[7, 8]))
        assert out_c.finished and len(out_c.outputs[0].token_ids) == 3
        assert eng.stats["prompt_tokens"] == 5  # a and c only

    asyncio.run(main())
    assert llm.healthy and llm.error is None
    _wait_for(lambda: _no_blocks_held(eng))
    llm.shutdown()


def test_add_cancelled_while_it_runs_is_aborted(tiny_dir):
    """The caller goes away while its add is running on the engine thread: the request is added,
    then aborted by the stream's cleanup, and its blocks are freed."""
    eng = _engine(tiny_dir)
    gate, entered = threading.Event(), threading.Event()
    real_add = eng.add_request

    def slow_add(*a, **kw):
        entered.set()
        assert gate.wait(30)
        return real_add(*a, **kw)

    eng.add_request = slow_add
    llm = AsyncLLM(eng)

    async def main():
        b = asyncio.create_task(_collect(llm.generate(None, SamplingParams(max_tokens=50, **GREEDY), "b",
                                                      prompt_token_ids=[4, 5, 6])))
        await asyncio.to_thread(entered.wait, 30)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        gate.set()

    asyncio.run(main())
    _wait_for(lambda: eng.stats["prompt_tokens"] == 3)  # it was added ...
    _wait_for(lambda: _no_blocks_held(eng))  # ... and aborted, blocks freed
    assert llm.healthy
    llm.shutdown()


def test_many_random_cancellations_leak_nothing(tiny_dir):
    eng = _engine(tiny_dir)
    llm = AsyncLLM(eng)

    async def one(i):
        gen = llm.generate(None, SamplingParams(max_tokens=40, **GREEDY), f"r{i}", prompt_token_ids=[1 + i % 7, 2, 3])
        try:
            await asyncio.wait_for(_collect(gen), timeout=(i % 9) * 0.002)
        except asyncio.TimeoutError:
            pass

    async def main():
        await asyncio.gather(*(one(i) for i in range(120)))
        out = await _collect(llm.generate(None, SamplingParams(max_tokens=4, **GREEDY), "last",
                                          prompt_token_ids=[1, 2, 3]))
        assert len(out.outputs[0].token_ids) == 4

    asyncio.run(main())
    _wait_for(lambda: _no_blocks_held(eng))
    assert llm.healthy
    llm.shutdown()


# -- 2. failure isolation ------------------------------------------------------------------------
def test_step_failure_fails_only_that_steps_requests(tiny_dir):
    eng = _engine(tiny_dir)
    real, calls = eng.runner.execute, [0]

    def fail_second_step(sched):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected step failure")
        return real(sched)

    eng.runner.execute = fail_second_step
    llm = AsyncLLM(eng)

    async def main():
        p = SamplingParams(max_tokens=8, **GREEDY)
        a = asyncio.create_task(_collect(llm.generate(None, p, "a", prompt_token_ids=[1, 2, 3])))
        b = asyncio.create_task(_collect(llm.generate(None, p, "b", prompt_token_ids=[4, 5])))
        res = await asyncio.gather(a, b, return_exceptions=True)
        assert all(isinstance(r, RequestFailedError) for r in res), res
        assert "injected step failure" in str(res[0])
        out = await _collect(llm.generate(None, p, "c", prompt_token_ids=[1, 2, 3]))
        assert out.finished and len(out.outputs[0].token_ids) == 8

    asyncio.run(main())
    assert llm.healthy and eng.consecutive_step_failures == 0
    _wait_for(lambda: _no_blocks_held(eng))
    llm.shutdown()


def test_postprocessing_failure_fails_that_request_alone(tiny_dir):
    eng = _engine(tiny_dir)
    alone = LLMEngine(eng.config, loaded=eng.loaded, progress=False)
    ref = [eng_out.outputs[0].token_ids for eng_out in _run_sync(alone, {"good": [4, 5, 6]})]
    real = eng.output_processor.process

    def process(seq, toks):
        if seq.request_id == "bad" and seq.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(seq, toks)

    eng.output_processor.process = process
    outs = {o.request_id: o for o in _run_sync(eng, {"bad": [1, 2, 3], "good": [4, 5, 6]})}
    assert outs["bad"].error and "post-processing failed" in outs["bad"].error
    assert outs["good"].error is None and outs["good"].outputs[0].token_ids == ref[0]
    assert _no_blocks_held(eng)


def _run_sync(eng: LLMEngine, prompts: dict[str, list[int]], max_tokens: int = 8):
    for rid, ids in prompts.items():
        eng.add_request(rid, None, SamplingParams(max_tokens=max_tokens, **GREEDY), prompt_token_ids=ids,
                        output_kind=OutputKind.FINAL)
    final = []
    while eng.has_unfinished_requests():
        final.extend(o for o in eng.step() if o.finished)
    return sorted(final, key=lambda o: list(prompts).index(o.request_id))


def test_engine_that_cannot_continue_stops_and_says_so(tiny_dir):
    eng = _engine(tiny_dir)

    def broken(sched):
        raise RuntimeError("device lost")

    eng.runner.execute = broken
    died = []
    llm = AsyncLLM(eng, max_step_failures=3, on_fatal=died.append)

    async def main():
        p = SamplingParams(max_tokens=4, **GREEDY)
        for i in range(3):  # three steps fail in a row: three failed requests, then the engine stops
            with pytest.raises((RequestFailedError, EngineDeadError)):
                await _collect(llm.generate(None, p, f"r{i}", prompt_token_ids=[1, 2]))
        _wait_for(lambda: not llm.healthy)
        with pytest.raises(EngineDeadError):
            await _collect(llm.generate(None, p, "late", prompt_token_ids=[1, 2]))

    asyncio.run(main())
    assert not llm.healthy and isinstance(llm.error, EngineDeadError) and died == [llm.error]


# -- 3. outputs: deltas, coalesced for slow readers -----------------------------------------------
def test_delta_stream_equals_the_whole_output(tiny_dir):
    eng = _engine(tiny_dir)
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=3, logprobs=2, n=2, stop=["xyz"])
    ref = _run_sync_params(LLMEngine(eng.config, loaded=eng.loaded, progress=False), [1, 2, 3], params)
    llm = AsyncLLM(eng)
    deltas = []

    async def main():
        async for out in llm.generate(None, params, "d", prompt_token_ids=[1, 2, 3]):
            deltas.append(out)

    asyncio.run(main())
    llm.shutdown()
    assert len(deltas) > 5
    # each delta holds only new tokens: their counts add up to the whole
    assert sum(len(c.token_ids) for d in deltas for c in d.outputs) == sum(len(c.token_ids) for c in ref.outputs)
    acc = deltas[0]
    for d in deltas[1:]:
        acc.add(d)
    for got, want in zip(acc.outputs, ref.outputs):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.logprobs == want.logprobs and got.finish_reason == want.finish_reason


def _run_sync_params(eng, ids, params):
    eng.add_request("ref", None, params, prompt_token_ids=ids, output_kind=OutputKind.FINAL)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                return o


def test_slow_reader_gets_coalesced_deltas(tiny_dir):
    """A reader that stops reading finds one merged output waiting, not one per step."""
    eng = _engine(tiny_dir)
    llm = AsyncLLM(eng)
    seen = []

    async def main():
        gen = llm.generate(None, SamplingParams(max_tokens=120, **GREEDY), "s", prompt_token_ids=[1, 2, 3])
        seen.append(await gen.__anext__())
        await asyncio.to_thread(_wait_for, lambda: "s" not in eng.requests)  # it finished meanwhile
        async for out in gen:
            seen.append(out)

    asyncio.run(main())
    llm.shutdown()
    assert len(seen) == 2 and seen[1].finished
    assert len(seen[0].outputs[0].token_ids) + len(seen[1].outputs[0].token_ids) == 120


def test_engine_outputs_never_copy_the_history(tiny_dir):
    eng = _engine(tiny_dir)
    eng.add_request("h", None, SamplingParams(max_tokens=64, **GREEDY), prompt_token_ids=[1, 2],
                    output_kind=OutputKind.DELTA)
    sizes = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            sizes.append(len(o.outputs[0].token_ids) if o.outputs else 0)
    assert sum(sizes) == 64 and max(sizes) == 1


def test_prompt_logprobs_computed_once_per_request(tiny_dir):
    eng = _engine(tiny_dir)
    rows = []
    real = eng.runner._prompt_logprobs
    eng.runner._prompt_logprobs = lambda s, h: (rows.append(s.seq.index), real(s, h))[1]
    prompt = list(range(1, 40))
    eng.add_request("p", None, SamplingParams(max_tokens=2, n=8, prompt_logprobs=1, **GREEDY),
                    prompt_token_ids=prompt, output_kind=OutputKind.FINAL)
    out = None
    while eng.has_unfinished_requests():
        out = next((o for o in eng.step() if o.finished), out)
    assert set(rows) == {0}  # only the first sample scored the prompt
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert len(out.outputs) == 8


# -- 4. decode batches split by the memory plan ---------------------------------------------------
def test_decode_groups_respect_the_budget(tiny_dir):
    eng = _engine(tiny_dir)
    runner = eng.runner

    class S:
        def __init__(self, start):
            self.start = start

    runner.decode_gather_tokens = 1000
    decodes = [S(9)] * 50 + [S(99)] * 5 + [S(899)]
    groups = runner._decode_groups(decodes)
    assert groups[0] == (0, 50) and groups[-1] == (55, 56)
    for g0, g1 in groups:
        assert (g1 - g0) * (decodes[g1 - 1].start + 1) <= 1000 or g1 - g0 == 1
    runner.decode_gather_tokens = None
    assert runner._decode_groups(decodes) == [(0, 56)]


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_split_decode_batches_give_identical_tokens(tiny_dir, kv):
    prompts = {"long": list(range(1, 200)), **{f"s{i}": [1 + i, 2, 3] for i in range(8)}}
    eng = _engine(tiny_dir, kv_cache_dtype=kv, max_num_seqs=16)
    eng.runner.decode_gather_tokens = None  # one padded batch
    ref = [o.outputs[0].token_ids for o in _run_sync(eng, prompts, max_tokens=12)]
    eng.runner.decode_gather_tokens = 64  # the long one alone, the short ones in small groups
    got = [o.outputs[0].token_ids for o in _run_sync(eng, {f"x{k}": v for k, v in prompts.items()}, max_tokens=12)]
    assert got == ref


def test_one_long_and_many_short_decodes_stay_within_the_plan(tmp_path):
    """Unsplit, 1 decode at 4000 tokens beside 63 short ones pads all 64 to 4000: a 1 GiB K/V
    gather per layer on this model. Split by the plan's budget, decode adds little to the peak."""
    from tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "wide", hidden=512, heads=8, kv_heads=8, head_dim=64, layers=2,
                                 intermediate=256, max_pos=4096)
    script = textwrap.dedent(f"""
        import json, resource
        import torch
        torch.set_num_threads(2)
        from qwenrun.config import EngineConfig
        from qwenrun.engine.llm_engine import LLMEngine
        from qwenrun.sampling_params import SamplingParams
        eng = LLMEngine(EngineConfig(model={str(ckpt)!r}, max_model_len=4096, kv_cache_memory=0.5,
                                     max_num_seqs=64), progress=False)
        p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        eng.add_request("long", None, p, prompt_token_ids=[5] * 4000)
        for i in range(63):
            eng.add_request(f"s{{i}}", None, p, prompt_token_ids=[5, 6, 7 + i % 50])
        while any(s.num_computed_tokens < s.prompt_len for s in list(eng.scheduler.running) + list(eng.scheduler.waiting)):
            eng.step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):
            eng.step()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_mib": (after - before) / 1024, "budget": eng.plan.decode_gather_tokens,
                          "activation_mib": eng.plan.activation_bytes / 2**20}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # the gather budget: one full context (4096) or 256 MiB of K/V, whichever is more
    assert res["budget"] >= 4096
    assert res["growth_mib"] < 200, res  # unsplit: > 1000 MiB
