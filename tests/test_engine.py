"""Engine equivalence on a tiny random checkpoint in fp32: batching, chunked prefill, prefix
caching and preemption never change greedy tokens, and logprobs stay within 1e-5."""
from __future__ import annotations

import random

import pytest
import torch

from qwenrun import LLM, SamplingParams
from conftest import DEVICES
from tiny import hf_model

PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny model: layers * (K,V) * kv_heads * head_dim * fp32 bytes


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0,
                          logprobs=2, **kw)


def make_llm(path, device="cpu", **kw):
    kw.setdefault("kv_cache_memory", 0.02)
    kw.setdefault("max_model_len", 256)
    return LLM(str(path), dtype="float32", block_size=4, device=device, **kw)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 390) for _ in range(rng.randrange(1, 40))] for _ in range(16)]


@pytest.fixture(scope="module")
def reference(tiny_dir, prompts):
    """Every prompt alone, unbatched, no prefix cache, unchunked."""
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    return [llm.generate(prompt_token_ids=[p], sampling_params=greedy())[0].outputs[0] for p in prompts]


def assert_same(outs, ref):
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids
        for a, b in zip(o.logprobs, r.logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_alone_vs_sixteen_mixed_prompts_together(tiny_dir, prompts, reference, device):
    llm = make_llm(tiny_dir, device, enable_prefix_caching=False)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert llm.engine.runner.max_batch_seqs == 16  # really batched
    assert_same(outs, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 7, 100000])
def test_chunked_prefill(tiny_dir, prompts, reference, chunk, device):
    llm = make_llm(tiny_dir, device, enable_prefix_caching=False, max_num_batched_tokens=chunk)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert_same(outs, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_cache_on_vs_off(tiny_dir, device):
    rng = random.Random(1)
    shared = [rng.randrange(3, 390) for _ in range(23)]
    ps = [shared + [rng.randrange(3, 390) for _ in range(k)] for k in (1, 5, 9, 0)] + [shared[:9]]
    off = make_llm(tiny_dir, enable_prefix_caching=False)
    ref = [off.generate(prompt_token_ids=[p], sampling_params=greedy())[0].outputs[0] for p in ps]
    on = make_llm(tiny_dir, device, enable_prefix_caching=True)
    first = on.generate(prompt_token_ids=[ps[0]], sampling_params=greedy())[0]
    outs = [first.outputs[0]] + [o.outputs[0] for o in on.generate(prompt_token_ids=ps[1:], sampling_params=greedy())]
    assert on.engine.block_manager.prefix_hits >= 20  # the shared 5 blocks were reused
    assert_same(outs, ref)
    # a second identical round is served almost entirely from the cache, same answers
    again = [o.outputs[0] for o in on.generate(prompt_token_ids=ps, sampling_params=greedy())]
    assert_same(again, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_preempted_and_resumed_vs_never_preempted(tiny_dir, prompts, reference, device):
    # 40 blocks of 4 tokens: far less than 16 sequences need, so the scheduler must preempt.
    llm = make_llm(tiny_dir, device, enable_prefix_caching=False, kv_cache_memory=160 * PER_TOKEN / 2**30,
                   max_model_len=64)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outs, reference)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_logprobs_match_transformers_log_softmax(tiny_dir, prompts):
    llm = make_llm(tiny_dir)
    p = prompts[3] + prompts[4]
    out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.0, logprobs=3, prompt_logprobs=2))[0]
    full = p + out.outputs[0].token_ids
    ref = torch.log_softmax(hf_model(tiny_dir)(torch.tensor([full])).logits[0].double(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        d = out.prompt_logprobs[i]
        assert abs(d[p[i]] - ref[i - 1, p[i]].item()) <= 1e-5
        top = ref[i - 1].topk(2).indices.tolist()
        assert set(top) <= set(d)
    for j, (tok, d) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(p) - 1 + j]
        assert tok == row.argmax().item()
        for k, v in d.items():
            assert abs(v - row[k].item()) <= 1e-5
        assert set(row.topk(3).indices.tolist()) <= set(d)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(
        out.outputs[0].token_ids, out.outputs[0].logprobs)))


def sample(**kw):
    kw = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_tokens": 10,
          "ignore_eos": True, **kw}
    return SamplingParams(**kw)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducible_alone_or_in_any_batch(tiny_dir, prompts, device):
    llm = make_llm(tiny_dir, device)
    alone = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=sample(seed=1234))[0].outputs[0].token_ids
    batch_params = [sample(seed=1234)] + [sample(seed=i) for i in range(7)]
    batched = llm.generate(prompt_token_ids=[prompts[0]] + prompts[1:8], sampling_params=batch_params)
    assert batched[0].outputs[0].token_ids == alone
    other = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=sample(seed=99))[0].outputs[0].token_ids
    assert other != alone


def test_n3_gives_distinct_samples_sharing_the_prompt(tiny_dir, prompts):
    llm = make_llm(tiny_dir)
    p = prompts[2] * 3  # long enough to fill a few blocks
    out = llm.generate(prompt_token_ids=[p], sampling_params=sample(n=3, seed=5))[0]
    seqs = [o.token_ids for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(s) for s in seqs}) == 3
    assert llm.engine.block_manager.prefix_hits >= (len(p) - 1) // 4 * 4 * 2  # siblings reused the prompt
    again = llm.generate(prompt_token_ids=[p], sampling_params=sample(n=3, seed=5))[0]
    assert [o.token_ids for o in again.outputs] == seqs


def test_stop_strings_across_tokens_and_multibyte(tiny_dir):
    llm = make_llm(tiny_dir)
    tok = llm.get_tokenizer()
    base = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                         repetition_penalty=1.0))[0].outputs[0]
    text = base.text
    assert len(text) > 6
    ids = base.token_ids
    # a stop string made of the end of one token's text and the start of the next
    cut = None
    for i in range(2, len(ids) - 1):
        a, b = tok.decode(ids[:i]), tok.decode(ids[:i + 1])
        if len(a) >= 2 and len(b) > len(a) and a.isprintable() and b.isprintable():
            cut = (a[-2:] + b[len(a):len(a) + 1], len(a) - 2)
            break
    assert cut is not None
    stop, pos = cut
    first = text.find(stop)
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        repetition_penalty=1.0, stop=[stop]))[0].outputs[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        repetition_penalty=1.0, stop=[stop],
                                                        include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[:first + len(stop)]


def test_stream_never_shows_a_stop_string_prefix(tiny_dir):
    llm = make_llm(tiny_dir)
    base = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                         repetition_penalty=1.0))[0].outputs[0].text
    stop = base[8:12]
    seen = [o.outputs[0].text for o in llm.stream("Hello world", SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.0, stop=stop))]
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)  # text only grows: nothing shown is ever taken back
    assert seen[-1] == base[:base.find(stop)]


def test_abort_frees_blocks(tiny_dir, prompts):
    llm = make_llm(tiny_dir)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", None, sample(max_tokens=50), prompt_token_ids=p)
    eng.step()
    eng.step()
    for i in range(len(prompts)):
        eng.abort_request(f"a{i}")
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
