"""Speculative decoding (ngram prompt lookup and a draft model) against plain decoding.

Greedy output must be the same tokens as plain decoding (and logprobs within the 1e-5 that
batching itself allows), whatever the batch holds: speculative and plain sequences side by side,
chunked prefill, prefix caching on or off, preemption, stops inside an accepted run, n > 1. Seeded
sampling gives the same tokens too (one noise draw per emitted token), and a statistical test checks
the verifier's output distribution against the target distribution on a small vocabulary."""
from __future__ import annotations

import random

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.engine.sampler import Sampler
from qwenrun.engine.sequence import Sequence
from qwenrun.engine.spec_config import SpeculativeConfig
from qwenrun.engine.spec_decode import make_spec_decoder, verify
from tiny import write_tiny_checkpoint

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def greedy(max_tokens=24, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0,
                          logprobs=2, **kw)


def make_llm(path, **kw):
    kw.setdefault("kv_cache_memory", 0.02)
    kw.setdefault("max_model_len", 256)
    return LLM(str(path), dtype="float32", block_size=4, **kw)


def set_spec(llm, cfg):
    """Switch speculation on (cfg) or off (None) on a loaded engine."""
    eng = llm.engine
    eng.spec = make_spec_decoder(SpeculativeConfig.parse(cfg), eng)
    eng.scheduler.on_finish = eng.spec.release if eng.spec else None


@pytest.fixture(scope="module")
def prompts():
    # Repetitive prompts (code-like: a motif repeated with variations) give prompt lookup matches;
    # random ones give none: both kinds in every batch.
    rng = random.Random(0)
    out = []
    for i in range(12):
        if i % 3 == 2:
            out.append([rng.randrange(3, 390) for _ in range(rng.randrange(2, 30))])
        else:
            motif = [rng.randrange(3, 390) for _ in range(rng.randrange(3, 8))]
            out.append((motif * 6)[:rng.randrange(12, 40)])
    return out


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return make_llm(tiny_dir, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def reference(plain, prompts):
    """Every prompt alone, plain decoding, no prefix cache, unchunked."""
    return [plain.generate(prompt_token_ids=[p], sampling_params=greedy())[0].outputs[0] for p in prompts]


def assert_same(outs, ref):
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids
        assert o.finish_reason == r.finish_reason and o.stop_reason == r.stop_reason
        assert len(o.logprobs) == len(r.logprobs)
        for a, b in zip(o.logprobs, r.logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) <= 1e-5
        assert o.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-4)


def record_steps(llm):
    """Wrap the runner: per step, how many scheduled sequences verified proposals / decoded plainly,
    and the token runs each sequence got."""
    eng, log = llm.engine, []
    real = eng.runner.execute

    def execute(sched):
        res = real(sched)
        log.append({"spec": sum(1 for s in sched.scheduled if s.num_spec),
                    "plain": sum(1 for s in sched.scheduled if not s.num_spec and s.samples),
                    "runs": {sid: [t for t, _ in v] for sid, v in res.items()}})
        return res

    eng.runner.execute = execute
    return log


def spec_stats(llm):
    s = llm.engine.scheduler
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, msg", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown key"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "x", "quantization": "int3"}, "quantization"),
    ("{not json", "JSON"),
    ([1, 2], "JSON object"),
])
def test_bad_speculative_config(cfg, msg):
    from qwenrun import EngineConfig

    with pytest.raises(ValueError, match=msg):
        EngineConfig(model="demo", speculative_config=cfg)


def test_config_from_json_string_and_llm_kwarg(tiny_dir):
    llm = make_llm(tiny_dir, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    c = llm.engine.config.speculative_config
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 3, 3, 1)
    assert llm.engine.spec is not None


def test_draft_model_must_load(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="draft model"):
        make_llm(tiny_dir, speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                               "model": str(tmp_path / "missing")})


# -- greedy equivalence ----------------------------------------------------------------------------
def test_ngram_mixed_batch_identical_to_plain(tiny_dir, prompts, reference):
    llm = make_llm(tiny_dir, enable_prefix_caching=False, speculative_config=NGRAM)
    steps = record_steps(llm)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert_same(outs, reference)
    drafts, proposed, accepted = spec_stats(llm)
    assert accepted > 0 and proposed > accepted  # speculation really happened, and was sometimes wrong
    assert any(s["spec"] and s["plain"] for s in steps)  # speculative and plain rows in one forward
    assert max(len(r) for s in steps for r in s["runs"].values()) > 2  # multi-token runs were emitted
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("chunk", [1, 7])
def test_ngram_chunked_prefill(tiny_dir, prompts, reference, chunk):
    llm = make_llm(tiny_dir, enable_prefix_caching=False, max_num_batched_tokens=chunk, speculative_config=NGRAM)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert_same(outs, reference)
    if chunk > 1:
        assert spec_stats(llm)[2] > 0


def test_ngram_prefix_caching_on(tiny_dir, prompts, reference):
    llm = make_llm(tiny_dir, enable_prefix_caching=True, speculative_config=NGRAM)
    shared = [prompts[0] + p for p in prompts]  # a common prefix: cache hits
    ref = [make_llm(tiny_dir, enable_prefix_caching=False).generate(prompt_token_ids=[p], sampling_params=greedy())[0]
           .outputs[0] for p in shared[:6]]
    for _ in range(2):  # the second round hits blocks the first one (speculating) registered
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=shared[:6], sampling_params=greedy())]
        assert_same(outs, ref)
    assert llm.engine.block_manager.prefix_hits > 0 and spec_stats(llm)[2] > 0
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert_same(outs, reference)


def test_ngram_preemption(tiny_dir, prompts, reference):
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K,V) * kv_heads * head_dim * fp32 bytes
    llm = make_llm(tiny_dir, enable_prefix_caching=False, kv_cache_memory=120 * per_token / (1 << 30),
                   max_model_len=80, speculative_config=NGRAM)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(outs, reference)
    assert spec_stats(llm)[2] > 0


def test_draft_model_identical_to_plain(tiny_dir, tmp_path_factory, prompts, reference):
    other = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_draft"), seed=1)  # same tokenizer, other weights
    for draft, high in ((tiny_dir, True), (other, False)):
        llm = make_llm(tiny_dir, enable_prefix_caching=False, speculative_config={
            "method": "draft_model", "model": str(draft), "num_speculative_tokens": 3, "dtype": "float32"})
        outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy())]
        assert_same(outs, reference)
        drafts, proposed, accepted = spec_stats(llm)
        assert drafts > 0
        if high:  # the target drafting for itself: (almost) everything is accepted
            assert accepted >= 0.9 * proposed
        draft = llm.engine.spec.proposer
        assert not draft.shadows and draft.bm.num_free_blocks == draft.bm.num_blocks  # all released


def test_stops_inside_an_accepted_run(tiny_dir, plain):
    llm = make_llm(tiny_dir, enable_prefix_caching=False, speculative_config=NGRAM)
    steps = record_steps(llm)
    tok = llm.get_tokenizer()
    prompt = tok.encode("def add(a, b):\n    return a + b\n" * 3)
    base = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy(40))[0].outputs[0]
    assert base.token_ids == plain.generate(prompt_token_ids=[prompt], sampling_params=greedy(40))[0].outputs[0].token_ids
    # a token position emitted in the middle of a multi-token run, and the shortest stop string
    # whose first occurrence in the text ends with that token
    ids, found, seen = base.token_ids, None, 0
    full = tok.decode(ids)
    for s in steps:
        for run in s["runs"].values():
            for j in range(len(run) - 1):
                p = seen + j
                text_before, text_at = tok.decode(ids[:p]), tok.decode(ids[:p + 1])
                if found is None and len(text_at) > len(text_before) and full.startswith(text_at):
                    for n in range(1, len(text_at) - len(text_before) + 8):
                        stop = text_at[-n:]
                        if (stop.isprintable() and "\ufffd" not in stop
                                and text_at.find(stop) == len(text_at) - n):
                            found = (p, stop)
                            break
            seen += len(run)
    assert found is not None, "no run long enough to stop inside"
    p, stop = found
    cases = [{"stop": [stop]}, {"stop": [stop], "include_stop_str_in_output": True}, {"max_tokens": p + 1}]
    if ids[p] not in ids[:p]:
        cases.append({"stop_token_ids": [ids[p]]})
    for kw in cases:
        sp = greedy(**{"max_tokens": 40, **kw})
        a = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0]
        b = plain.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0]
        assert a.token_ids == b.token_ids == ids[:p + 1]
        assert (a.text, a.finish_reason, a.stop_reason) == (b.text, b.finish_reason, b.stop_reason)
        assert a.logprobs is not None and len(a.logprobs) == p + 1
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stream_text_only_grows(tiny_dir, plain):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.0, stop=["zzq"])
    seen = [o.outputs[0].text for o in llm.stream("def add(a, b):\n    return a + b\n", sp)]
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    assert seen[-1] == plain.generate(["def add(a, b):\n    return a + b\n"], sp)[0].outputs[0].text


def test_penalties_and_min_tokens_see_the_proposals(tiny_dir, prompts):
    """Row i of a verification is processed as if proposals 0..i-1 were appended."""
    sp = [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, min_tokens=8, logprobs=1),
          SamplingParams(temperature=0, max_tokens=20, frequency_penalty=0.5, presence_penalty=0.2, logprobs=1),
          SamplingParams(temperature=0, max_tokens=20, logit_bias={11: 2.0}, ignore_eos=True, logprobs=1)]
    ps = prompts[:3]
    ref = [make_llm(tiny_dir, enable_prefix_caching=False).generate(prompt_token_ids=[p], sampling_params=s)[0]
           .outputs[0] for p, s in zip(ps, sp)]
    llm = make_llm(tiny_dir, enable_prefix_caching=False, speculative_config=NGRAM)
    outs = [o.outputs[0] for o in llm.generate(prompt_token_ids=ps, sampling_params=sp)]
    assert_same(outs, ref)


class _Oracle:
    """Proposes from a known continuation: right (the reference tokens) or always wrong."""

    def __init__(self, ref: list[int], prompt_len: int, right: bool, vocab: int) -> None:
        self.ref, self.n0, self.right, self.vocab = ref, prompt_len, right, vocab

    def propose(self, seqs, ks):
        out = []
        for s, k in zip(seqs, ks):
            nxt = self.ref[s.num_tokens - self.n0:s.num_tokens - self.n0 + k]
            out.append(nxt if self.right else [(t + 1) % self.vocab for t in nxt])
        return out

    def release(self, seq):
        pass


@pytest.mark.parametrize("right", [True, False])
def test_back_off_when_proposals_fail(tiny_dir, plain, right):
    """At a fixed verification cost (alpha = 0.2), always-wrong proposals are soon tried rarely,
    always-right ones on (almost) every step; the tokens are the plain ones either way."""
    from qwenrun.engine.spec_decode import SpecDecoder

    prompt = [7, 8, 9, 10]
    sp = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True, repetition_penalty=1.0)
    ref = plain.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0].token_ids
    llm = make_llm(tiny_dir)
    eng = llm.engine
    dec = SpecDecoder(SpeculativeConfig.parse(NGRAM), _Oracle(ref, len(prompt), right, eng.model_config.vocab_size))
    dec.alpha = 0.2
    dec.step_time = lambda sched, seconds: None  # keep the cost fixed: this tests the policy
    eng.spec = dec
    steps = record_steps(llm)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0].token_ids
    assert out == ref
    drafts, proposed, accepted = spec_stats(llm)
    if right:
        assert accepted == proposed and len(steps) < 150 / 3
    else:
        assert accepted == 0 and drafts <= 0.12 * 150, drafts  # mostly plain steps after the first failures


# -- sampling ---------------------------------------------------------------------------------------
def sample(**kw):
    return SamplingParams(**{"temperature": 0.8, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0,
                             "max_tokens": 24, "ignore_eos": True, "logprobs": 1, **kw})


def test_seeded_sampling_and_n3_identical_to_plain(tiny_dir, prompts, plain):
    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    ps = prompts[:4]
    params = [sample(seed=7), sample(n=3, seed=11), sample(seed=3, temperature=0.3), greedy(n=2)]
    a = llm.generate(prompt_token_ids=ps, sampling_params=params)
    b = plain.generate(prompt_token_ids=ps, sampling_params=params)
    for x, y in zip(a, b):
        assert len(x.outputs) == len(y.outputs)
        assert_same(x.outputs, y.outputs)
    assert spec_stats(llm)[2] > 0


def _target_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    v, i = (logits / temperature).topk(top_k)
    p = torch.zeros_like(logits)
    p[i] = v.softmax(-1)
    return p


def test_verifier_preserves_the_target_distribution():
    """Many independent sequences, one verification each, proposals (d0, d1) on an 8-token
    vocabulary: the first token must follow p0; given d0 was accepted the second must follow p1.
    A chi-square test over the 15 outcomes {t0 != d0} u {(d0, t1)}; p = 0.001 critical value."""
    torch.manual_seed(0)
    V, N, T, K = 8, 6000, 0.9, 6
    rows = torch.randn(3, V) * 1.5
    d0, d1 = int(rows[0].argsort()[-2]), int(rows[1].argmax())  # d0 is not the most likely token
    params = SamplingParams(temperature=T, top_k=K, top_p=1.0, repetition_penalty=1.0, max_tokens=8)
    items = []
    for i in range(N):
        s = Sequence("r", 0, [1, 2], params)
        s.generator = torch.Generator().manual_seed(1000 + i)
        items.append((s, [d0, d1]))
    out = verify(Sampler(V), rows.repeat(N, 1), items)
    p0, p1 = _target_probs(rows[0], T, K), _target_probs(rows[1], T, K)
    expected = {("a", t): float(p0[t]) for t in range(V) if t != d0}
    expected.update({("b", t): float(p0[d0] * p1[t]) for t in range(V)})
    counts = dict.fromkeys(expected, 0)
    for s, _ in items:
        run = [t for t, _ in out[s.seq_id]]
        assert 1 <= len(run) <= 3 and run[:-1] == [d0, d1][:len(run) - 1]
        counts[("a", run[0]) if run[0] != d0 else ("b", run[1])] += 1
    chi2 = sum((counts[c] - N * e) ** 2 / (N * e) for c, e in expected.items() if e > 0)
    assert all(counts[c] == 0 for c, e in expected.items() if e == 0)  # nothing outside top_k
    assert chi2 < 36.12, (chi2, counts)  # df = 14 (15 outcomes, top-k zeros excepted: fewer is stricter)
    tv = 0.5 * sum(abs(counts[c] / N - e) for c, e in expected.items())
    assert tv < 0.03
    # and the test has power: the same counts against a slightly different target (T = 1.1) fail
    q0, q1 = _target_probs(rows[0], 1.1, K), _target_probs(rows[1], 1.1, K)
    off = {("a", t): float(q0[t]) for t in range(V) if t != d0}
    off.update({("b", t): float(q0[d0] * q1[t]) for t in range(V)})
    assert sum((counts[c] - N * e) ** 2 / (N * e) for c, e in off.items() if e > 0) > 36.12


# -- the demo model ------------------------------------------------------------------------------------
EDIT_PROMPT = """Rename the function `compute_total` to `sum_prices` everywhere in this file and reply with the whole file.

```python
def compute_total(prices):
    total = 0
    for p in prices:
        total += p
    return total


def report(prices):
    return f"total: {compute_total(prices)}"
```"""


def test_demo_model_greedy_identical(demo_llm):
    msgs = [{"role": "user", "content": EDIT_PROMPT}]
    sp = SamplingParams(temperature=0, max_tokens=48, logprobs=1)
    eng = demo_llm.engine
    assert eng.spec is None
    try:
        base = demo_llm.chat(msgs, sp)[0].outputs[0]
        set_spec(demo_llm, {"method": "ngram", "num_speculative_tokens": 5})
        before = eng.scheduler.num_accepted_tokens
        spec = demo_llm.chat(msgs, sp)[0].outputs[0]
        assert eng.scheduler.num_accepted_tokens - before >= 10  # editing: most of the reply is copied
    finally:
        set_spec(demo_llm, None)
    assert spec.token_ids == base.token_ids and spec.text == base.text
    for a, b in zip(spec.logprobs, base.logprobs):
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-3


# -- metrics and the command line -------------------------------------------------------------------
def test_metrics_report_acceptance(tiny_dir, prompts):
    from types import SimpleNamespace

    from qwenrun.server.metrics import ServerMetrics

    llm = make_llm(tiny_dir, speculative_config=NGRAM)
    llm.generate(prompt_token_ids=prompts[:4], sampling_params=greedy())
    d, t, a = spec_stats(llm)
    fake = SimpleNamespace(engine=llm.engine, healthy=True, max_running_seen=4, step_count=1)
    text = ServerMetrics("tiny", lambda: fake).render().decode()
    vals = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith("qwenrun:spec_decode")}
    assert vals["qwenrun:spec_decode_num_drafts_total"] == d and vals["qwenrun:spec_decode_num_accepted_tokens_total"] == a
    assert vals["qwenrun:spec_decode_acceptance_rate"] == pytest.approx(a / t)
    assert vals["qwenrun:spec_decode_mean_acceptance_length"] == pytest.approx(1 + a / d)
    plain = SimpleNamespace(engine=make_llm(tiny_dir).engine, healthy=True, max_running_seen=0, step_count=0)
    assert "spec_decode" not in ServerMetrics("tiny", lambda: plain).render().decode()


def test_cli_bad_speculative_config_is_one_line_exit_2():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qwenrun.cli", "serve", "demo", "--speculative-config",
                        '{"method": "ngram", "num_speculative_tokens": -1}'], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_speculative_tokens" in lines[0], r.stderr


def test_bench_reports_acceptance(tiny_dir):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qwenrun.cli", "bench", "latency", str(tiny_dir), "--input-len", "16",
                        "--output-len", "24", "--repeats", "1", "--warmup", "0", "--max-model-len", "128",
                        "--kv-cache-memory", "0.01", "--speculative-config", json.dumps(NGRAM)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    dec = [json.loads(ln) for ln in r.stdout.splitlines() if '"decode"' in ln][0]
    assert dec["speculative"] == "ngram" and 0 <= dec["spec_acceptance_rate"] <= 1
    assert dec["spec_mean_acceptance_length"] >= 1 and dec["tokens_per_s"] > 0
