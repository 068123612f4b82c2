"""Scheduler and block manager with fake sampled tokens and no model."""
from __future__ import annotations

import pytest

from qwenrun.engine.block_manager import BlockManager
from qwenrun.engine.scheduler import Scheduler
from qwenrun.engine.sequence import Sequence, SequenceStatus
from qwenrun.sampling_params import SamplingParams

BS = 4


def make(num_blocks=64, max_seqs=8, budget=32, caching=True):
    bm = BlockManager(num_blocks, BS, caching)
    return bm, Scheduler(bm, max_seqs, budget)


def seq(tokens, max_tokens=4, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams(temperature=0, max_tokens=max_tokens), frozenset({999}))


def step(sched, token=7):
    out = sched.schedule()
    sampled = {s.seq.seq_id: token for s in out.scheduled if s.samples}
    sched.update(out, sampled)
    return out


def run_all(sched, limit=1000):
    n = 0
    while sched.has_unfinished() and n < limit:
        step(sched)
        n += 1
    return n


def assert_all_free(bm: BlockManager):
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks


def test_admission_and_budget():
    bm, s = make(budget=10)
    a, b, c = seq(range(8)), seq(range(100, 108)), seq(range(200, 208))
    for x in (a, b, c):
        s.add(x)
    out = s.schedule()
    assert [(x.seq, x.start, x.num_tokens) for x in out.scheduled] == [(a, 0, 8), (b, 0, 2)]
    assert out.num_tokens == 10 and c.status is SequenceStatus.WAITING
    assert not out.scheduled[1].samples and out.scheduled[0].samples


def test_chunked_prefill_then_decode():
    bm, s = make(budget=7)
    a = seq(range(25), max_tokens=3)
    s.add(a)
    chunks = []
    while s.has_unfinished():
        out = step(s)
        chunks.append([x.num_tokens for x in out.scheduled])
    assert chunks == [[7], [7], [7], [4], [1], [1]]
    assert a.output_token_ids == [7, 7, 7] and a.finish_reason == "length"
    assert_all_free(bm)


def test_prefill_and_decode_share_a_step():
    bm, s = make(budget=16)
    a = seq(range(4), max_tokens=10)
    s.add(a)
    step(s)
    b = seq(range(50, 70))
    s.add(b)
    out = s.schedule()
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(a, 1), (b, 15)]


def test_max_num_seqs():
    bm, s = make(max_seqs=2)
    for i in range(3):
        s.add(seq(range(i * 10, i * 10 + 3)))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_prefix_hit_exact_and_last_token_recomputed():
    bm, s = make()
    a = seq(range(12), max_tokens=1)  # 3 full blocks
    s.add(a)
    run_all(s)
    assert len(bm.cached) == 3  # prompt blocks committed (the 13th token's block is partial)
    b = seq(list(range(12)) + [50, 51], max_tokens=1)
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 12 and out.scheduled[0].start == 12 and out.scheduled[0].num_tokens == 2
    c = seq(range(12), max_tokens=1)  # identical prompt: the last token is never taken from cache
    s.add(c)
    out = s.schedule()
    assert c.num_cached_tokens == 8 and out.scheduled[-1].num_tokens == 4
    run_all(s)
    assert_all_free(bm)


def test_prefix_hash_collision_is_rejected(monkeypatch):
    bm, s = make()
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda parent, tokens: 42))
    a = seq(range(8), max_tokens=1)
    s.add(a)
    run_all(s)
    b = seq(range(100, 108), max_tokens=1)  # same (forced) hash, different tokens
    s.add(b)
    s.schedule()
    assert b.num_cached_tokens == 0


def test_eviction_is_lru_and_spares_referenced_blocks():
    bm, s = make(num_blocks=6)
    a = seq(range(8), max_tokens=1)
    s.add(a)
    run_all(s)  # a's 2 prompt blocks are now cached and free
    cached_a = set(bm.cached.values())
    assert len(cached_a) == 2 and bm.num_free_blocks == 6
    b = seq(range(8), max_tokens=10)  # hits a's first block, holds it
    s.add(b)
    step(s)
    held = set(b.block_table)
    c = seq(range(300, 312), max_tokens=1)  # with b's next block, takes every free block
    s.add(c)
    s.schedule()
    assert c.status is SequenceStatus.RUNNING
    held = set(b.block_table)
    assert held == {0, 2, 3} and set(c.block_table) == {1, 4, 5}
    assert bm.blocks[0].hash in bm.cached  # cached and referenced by b: kept
    assert bm.blocks[1].hash is None and len(bm.cached) == 1  # cached but unreferenced: evicted
    for bid in held:
        assert bm.blocks[bid].ref_count == 1


def test_reset_prefix_cache_reuses_the_freed_blocks_before_untouched_ones():
    """Blocks forgotten by a cache reset are handed out before never-used ones: their memory is
    mapped already (a fresh CPU pool page-faults on first write). Without the reset they stay
    behind every never-used block (kept for prefix hits)."""
    bm, s = make(num_blocks=8)
    a = seq(range(8), max_tokens=1)
    s.add(a)
    run_all(s)
    used = set(bm.cached.values())
    assert len(used) == 2 and bm.num_free_blocks == 8
    assert list(bm.free)[:2] != sorted(used) and set(list(bm.free)[-2:]) == used  # cached: at the back
    bm.reset_prefix_cache()
    assert not bm.cached and set(list(bm.free)[:2]) == used
    b = seq(range(100, 108), max_tokens=1)
    s.add(b)
    s.schedule()
    assert set(b.block_table) == used


def test_preemption_by_recompute_and_resume():
    bm, s = make(num_blocks=5, budget=64)
    a, b = seq(range(8), max_tokens=8, rid="a"), seq(range(100, 108), max_tokens=8, rid="b")
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(200):
        if not s.has_unfinished():
            break
        out = step(s)
        preempted += out.preempted
    assert preempted and preempted[0] is b  # the most recently admitted goes first
    assert a.finish_reason == b.finish_reason == "length"
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    assert b.num_preemptions >= 1 and s.num_preemptions >= 1
    assert_all_free(bm)


def test_abort_at_any_moment_frees_everything():
    bm, s = make(budget=5)
    seqs = [seq(range(i * 20, i * 20 + 13), max_tokens=50, rid=str(i)) for i in range(4)]
    for x in seqs:
        s.add(x)
    step(s)
    step(s)
    for x in seqs:  # mid-prefill, running and waiting ones alike
        s.finish(x, "abort")
    assert not s.has_unfinished()
    assert_all_free(bm)
    assert all(x.finish_reason == "abort" for x in seqs)


def test_request_larger_than_pool_is_refused():
    bm, s = make(num_blocks=2)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(seq(range(40)))


def test_eos_and_stop_token_ids_finish():
    bm, s = make()
    a = seq(range(5), max_tokens=100)
    s.add(a)
    out = s.schedule()
    s.update(out, {a.seq_id: 999})  # the fake eos
    assert a.finish_reason == "stop" and a.is_finished
    b = Sequence("b", 0, [1, 2], SamplingParams(max_tokens=100, stop_token_ids=[5], min_tokens=2), frozenset())
    s.add(b)
    out = s.schedule()
    s.update(out, {b.seq_id: 5})
    assert not b.is_finished  # min_tokens not reached yet
    out = s.schedule()
    s.update(out, {b.seq_id: 5})
    assert b.finish_reason == "stop" and b.stop_reason == 5
    assert_all_free(bm)
