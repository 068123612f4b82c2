"""Sampler: exact top_k / top_p / min_p supports, sampled frequencies within chi-square bounds,
penalties and logit_bias, per-row reproducibility."""
from __future__ import annotations

import pytest
import torch

from qwenrun.engine.sampler import Sampler
from qwenrun.engine.sequence import Sequence
from qwenrun.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0])
V = LOGITS.numel()
# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def seqs_for(n, seed0=0, prompt=(1,), **kw):
    kw = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **kw}
    out = []
    for i in range(n):
        s = Sequence("r", 0, list(prompt), SamplingParams(**kw), frozenset({9}))
        s.generator = torch.Generator().manual_seed(seed0 + i)
        out.append(s)
    return out


def draw(n=6000, **kw):
    seqs = seqs_for(n, **kw)
    res = Sampler(V)(LOGITS.repeat(n, 1), seqs)
    return torch.bincount(torch.tensor(res.token_ids), minlength=V)


def expected(kind: str, **kw) -> torch.Tensor:
    """Reference distributions written from the definitions (HF warpers)."""
    t = kw.get("temperature", 1.0)
    p = torch.softmax(LOGITS.double() / t, -1)
    if kind == "top_k":
        k = kw["top_k"]
        p[k:] = 0
    elif kind == "top_p":  # smallest descending prefix whose mass reaches top_p
        c = torch.cumsum(p, 0)
        keep = (c - p) < kw["top_p"]
        p[~keep] = 0
    elif kind == "min_p":
        p[p < kw["min_p"] * p.max()] = 0
    return p / p.sum()


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float]:
    n = counts.sum().item()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
    exp = probs[support] * n
    stat = (((counts[support].double() - exp) ** 2) / exp).sum().item()
    return stat < CHI2_999[int(support.sum()) - 1], stat


@pytest.mark.parametrize("kind,kw", [
    ("plain", {}), ("plain", {"temperature": 0.5}), ("plain", {"temperature": 2.0}),
    ("top_k", {"top_k": 3}), ("top_k", {"top_k": 1}), ("top_p", {"top_p": 0.7}), ("top_p", {"top_p": 0.3}),
    ("min_p", {"min_p": 0.2}),
])
def test_frequencies_match_the_distribution(kind, kw):
    counts = draw(**kw)
    probs = expected(kind, **kw)
    if (probs > 0).sum() == 1:
        assert counts[probs.argmax()] == counts.sum()
        return
    ok, stat = chi2_ok(counts, probs)
    assert ok, f"chi2 {stat:.1f}"


def test_masks_are_exact():
    # top_k=4: exactly the 4 best ids. top_p=0.7: {0,1,2}. min_p=0.3 keeps p >= 0.3 pmax:
    # token 2 has p/pmax = e^-1 = 0.37, token 3 has e^-1.5 = 0.22 -> {0,1,2}
    assert set(torch.nonzero(draw(n=3000, top_k=4)).flatten().tolist()) == {0, 1, 2, 3}
    assert set(torch.nonzero(expected("top_p", top_p=0.7)).flatten().tolist()) == {0, 1, 2}
    assert set(torch.nonzero(draw(n=3000, top_p=0.7)).flatten().tolist()) == {0, 1, 2}
    assert set(torch.nonzero(draw(n=3000, min_p=0.3)).flatten().tolist()) == {0, 1, 2}


def test_combined_top_k_and_top_p_follow_hf_order():
    # top_k=5 first renormalises, then top_p on the survivors
    counts = draw(top_k=5, top_p=0.8)
    p = torch.softmax(LOGITS.double(), -1)
    p[5:] = 0
    p /= p.sum()
    c = torch.cumsum(p, 0)
    p[(c - p) >= 0.8] = 0
    ok, stat = chi2_ok(counts, p / p.sum())
    assert ok, stat


def test_large_vocab_candidate_window_equals_full_sort():
    """Rows with top_k use topk() candidates, rows without sort the vocabulary: same choices."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 3
    a = seqs_for(6, seed0=10, top_k=50, top_p=0.9)
    b = seqs_for(6, seed0=10, top_k=50, top_p=0.9)
    b.append(seqs_for(1, seed0=99, top_k=0, top_p=0.9)[0])  # forces the full-sort path for the batch
    ra = Sampler(5000)(logits, a).token_ids
    rb = Sampler(5000)(torch.cat([logits, logits[:1]]), b).token_ids[:6]
    assert ra == rb


def test_greedy_and_penalties():
    s = Sampler(V)
    greedy = seqs_for(1, temperature=0)
    assert s(LOGITS[None], greedy).token_ids == [0]
    # repetition penalty (CTRL/HF): token 0 present in the prompt: 2.0 / 3 < 1.5 -> token 1 wins
    rp = seqs_for(1, temperature=0, repetition_penalty=3.0, prompt=(0,))
    assert s(LOGITS[None], rp).token_ids == [1]
    # negative logits are multiplied: token 9 (-4.0) in prompt with penalty 2 -> -8
    rp_neg = seqs_for(1, temperature=0, repetition_penalty=2.0, prompt=(9,), logit_bias={9: 7.9})
    assert s(LOGITS[None], rp_neg).token_ids == [0]
    # frequency/presence penalties count generated tokens only
    fp = seqs_for(1, temperature=0, frequency_penalty=0.3, presence_penalty=0.0, prompt=(5,))
    fp[0].token_ids += [0, 0]  # token 0 generated twice: 2.0 - 0.6 = 1.4 < 1.5
    assert s(LOGITS[None], fp).token_ids == [1]
    pp = seqs_for(1, temperature=0, presence_penalty=0.6, prompt=(5,))
    pp[0].token_ids += [0]
    assert s(LOGITS[None], pp).token_ids == [1]
    bias = seqs_for(1, temperature=0, logit_bias={7: 100})
    assert s(LOGITS[None], bias).token_ids == [7]


def test_min_tokens_masks_eos():
    s = Sampler(V)
    logits = LOGITS.clone()
    logits[9] = 50.0  # eos (id 9) would win
    seq = seqs_for(1, temperature=0, min_tokens=2)
    assert s(logits[None], seq).token_ids != [9]
    seq[0].token_ids += [1, 2]
    assert s(logits[None], seq).token_ids == [9]


def test_padding_ids_never_sampled():
    logits = LOGITS.clone()
    logits[8] = 100.0
    assert Sampler(V, valid_vocab=8)(logits[None], seqs_for(1, temperature=0)).token_ids == [0]


def test_logprobs_are_raw_log_softmax():
    seq = seqs_for(1, temperature=0.5, top_k=2, logprobs=3)
    res = Sampler(V)(LOGITS[None], seq)
    ref = torch.log_softmax(LOGITS, -1)
    d = res.logprobs[0]
    assert set(d) >= {0, 1, 2}
    for k, v in d.items():
        assert v == pytest.approx(ref[k].item(), abs=1e-6)


def test_row_reproducible_regardless_of_neighbours():
    a = seqs_for(1, seed0=42, top_p=0.9)
    lone = Sampler(V)(LOGITS[None], a).token_ids[0]
    for extra in (1, 5, 17):
        b = seqs_for(1, seed0=42, top_p=0.9) + seqs_for(extra, seed0=1000, temperature=0.7, top_k=3)
        logits = torch.cat([LOGITS[None], torch.randn(extra, V)])
        assert Sampler(V)(logits, b).token_ids[0] == lone
