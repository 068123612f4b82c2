"""Speculative decoding: propose tokens cheaply, verify them in the target model's step.

A decoding sequence gets up to k proposed tokens (``seq.spec_token_ids``) before the step; the
scheduler runs its last token and the proposals as one short span (positions n-1 .. n-1+k); the
runner computes logits at all k+1 rows and ``verify`` walks them in order:

* row i is processed by the ordinary sampler pipeline *as if* proposals 0..i-1 were already
  appended (penalties, min_tokens and logit_bias see exactly the history plain decoding would),
  and the sampler picks a token t_i as plain decoding would at that point;
* while t_i equals proposal i the proposal is accepted and the walk goes on; the first t_i that
  differs (or the row after the last proposal) is the step's final token.

Both proposers here are deterministic (a point-mass draft distribution q = δ(d)). Rejection
sampling with such a q (accept d with probability min(1, p(d)/q(d)) = p(d), else sample from
(p - q)+ normalised = p without d) is exactly "sample x ~ p, accept iff x == d", which is what
the walk does, so the emitted tokens follow the target distribution. The sampler draws row i's
noise from the sequence's own generator only when row i is reached, one V-draw per emitted
token as plain decoding does: a seeded request gives the same tokens with or without speculation,
and greedy output is the same tokens by construction.

Back-off (``SpecDecoder``): per sequence, the proposal length is the one with the most expected
tokens per unit of step cost, from the sequence's measured acceptance and the measured cost of
verification; when no length pays, the sequence stops proposing for a cool-down that doubles each
time, so open-ended text pays almost nothing for the attempt."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .sampler import Sampler
from .sequence import Sequence, SequenceStatus
from .spec_config import SpeculativeConfig

log = logging.getLogger("qwenrun")

TokenLP = tuple[int, "dict[int, float] | None"]


class _Ahead:
    """A sequence seen with some proposed tokens already appended (what the sampler reads)."""

    __slots__ = ("seq", "extra", "_ids")

    def __init__(self, seq: Sequence, extra: list[int]) -> None:
        self.seq, self.extra, self._ids = seq, extra, None

    def __getattr__(self, name: str) -> Any:  # params, eos_token_ids, generator, grammar, ...
        return getattr(self.seq, name)

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self.seq.token_ids + self.extra
        return self._ids

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.seq.prompt_len:]


def verify(sampler: Sampler, logits: torch.Tensor, items: list[tuple[Sequence, list[int]]]) -> dict[int, list[TokenLP]]:
    """logits: one row per item, plus one per proposed token, in item order. Returns
    {seq_id: accepted proposals + the final token, each with its logprobs (or None)}."""
    base, r = [], 0
    for _, spec in items:
        base.append(r)
        r += len(spec) + 1
    assert r == logits.shape[0]
    out: dict[int, list[TokenLP]] = {seq.seq_id: [] for seq, _ in items}
    # Round 0: row 0 of every sequence, and every row of greedy ones (no randomness is consumed,
    # so their rows are independent). Sampling sequences then go one row per round.
    rows, views, owners = [], [], []
    for j, (seq, spec) in enumerate(items):
        upto = len(spec) if seq.params.temperature == 0 else 0
        for i in range(upto + 1):
            rows.append(base[j] + i)
            views.append(_Ahead(seq, spec[:i]) if i else seq)
            owners.append((j, i))
    alive = _walk(sampler, logits, rows, views, owners, items, out)
    depth = 1
    while alive:
        rows = [base[j] + depth for j in alive]
        views = [_Ahead(items[j][0], items[j][1][:depth]) for j in alive]
        alive = _walk(sampler, logits, rows, views, [(j, depth) for j in alive], items, out)
        depth += 1
    return out


def _walk(sampler, logits, rows, views, owners, items, out) -> list[int]:
    """Sample the given rows and extend each sequence's accepted run. Returns the sampling
    sequences whose proposal at their row was accepted and that have rows left."""
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    res = sampler(logits.index_select(0, idx) if len(rows) != logits.shape[0] else logits, views)
    alive, done = [], set()
    for (j, i), tok, lp in zip(owners, res.token_ids, res.logprobs):
        seq, spec = items[j]
        if j in done or len(out[seq.seq_id]) != i:
            continue  # a greedy row past the first mismatch
        out[seq.seq_id].append((tok, lp))
        if i < len(spec) and tok == spec[i]:
            if seq.params.temperature != 0:
                alive.append(j)
        else:
            done.add(j)
    return alive


# -- proposers -------------------------------------------------------------------------------------
class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    prompt_lookup_max down to prompt_lookup_min) and propose what followed it."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n_max, self.n_min = cfg.prompt_lookup_max, cfg.prompt_lookup_min

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._one(s, k) for s, k in zip(seqs, ks)]

    def _one(self, seq: Sequence, k: int) -> list[int]:
        st = seq.spec_state
        index: dict[int, list[int]] = st.index
        toks = seq.token_ids
        L = len(toks)
        # positions of every token but the last, kept incrementally (O(new tokens) per step)
        for p in range(st.indexed, L - 1):
            index.setdefault(toks[p], []).append(p)
        st.indexed = max(st.indexed, L - 1)
        cands = index.get(toks[-1])
        if not cands:
            return []
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            tail = toks[L - n:]
            for p in reversed(cands):  # latest occurrence first
                if p - n + 1 >= 0 and toks[p - n + 1:p + 1] == tail:
                    return toks[p + 1:p + 1 + k]
        return []

    def release(self, seq: Sequence) -> None:
        """Nothing to free: the n-gram index lives in the sequence's own _SeqSpec."""


class _SeqSpec:
    """Per-sequence proposer state: the acceptance estimate, the back-off and the n-gram index."""

    __slots__ = ("acc", "trials", "skip", "cooldown", "probe", "index", "indexed")

    def __init__(self) -> None:
        # decayed counts of accepted proposals and of proposals tried (a run stops at the first
        # rejection): per-token acceptance p = (acc + 0.5) / (trials + 1), starting optimistic
        self.acc, self.trials = 2.0, 2.0
        self.skip = 0  # steps left without proposing
        self.cooldown = 0  # the next back-off's length (doubles while proposing does not pay)
        self.probe = False  # after a back-off: one short proposal to re-measure acceptance
        self.index: dict[int, list[int]] = {}
        self.indexed = 0

    @property
    def p(self) -> float:
        return (self.acc + 0.5) / (self.trials + 1)


class SpecDecoder:
    """Drives one proposer for the engine: proposals before the step, feedback after it.

    How many tokens to propose (per sequence, per step) is the k that maximises expected tokens
    per step over the step's cost, E(k) / C(k) with E(k) = (1 - p^(k+1)) / (1 - p) for the
    sequence's per-token acceptance p (Leviathan et al. 2023, section 3.5) and C(k) = 1 + alpha*k
    the cost of verifying k+1 rows relative to a plain step; alpha is measured online from
    single-sequence steps (the batch-1 case that speculation is for; it starts at ALPHA0). When no k
    pays (E/C < 1), the sequence stops proposing for a cool-down that doubles each time (4 .. 256
    steps), then probes with one proposed token."""

    ALPHA0 = 0.15
    MIN_GAIN = 1.05  # propose only when the expected gain beats plain decoding by this much
    DECAY = 0.8  # weight of the past in the acceptance counts, per verification
    MIN_COOLDOWN, MAX_COOLDOWN = 4, 256

    def __init__(self, cfg: SpeculativeConfig, proposer) -> None:
        self.cfg = cfg
        self.proposer = proposer
        self.alpha = self.ALPHA0
        self._t_plain: float | None = None  # EMA seconds of a plain single-sequence decode step

    def best_k(self, p: float) -> int:
        """The proposal length with the most tokens per unit of cost, or 0 if none beats plain."""
        best, best_gain, e, pk = 0, self.MIN_GAIN, 1.0, 1.0
        for k in range(1, self.cfg.num_speculative_tokens + 1):
            pk *= p
            e += pk  # E(k) = 1 + p + ... + p^k
            gain = e / (1 + self.alpha * k)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        seqs, ks = [], []
        for seq in running:
            seq.spec_token_ids = []
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != seq.num_tokens - 1:
                continue  # prefilling: nothing to propose yet
            if seq.grammar is not None:
                continue  # the grammar state is advanced per accepted token only: no look-ahead
            st = seq.spec_state
            if st is None:
                st = seq.spec_state = _SeqSpec()
            if st.skip:
                st.skip -= 1
                if not st.skip:
                    st.probe = True
                continue
            k = 1 if st.probe else self.best_k(st.p)
            if not k:
                st.cooldown = min(self.MAX_COOLDOWN, max(self.MIN_COOLDOWN, 2 * st.cooldown))
                st.skip = st.cooldown
                continue
            p = seq.params
            if p.max_tokens is not None:
                k = min(k, p.max_tokens - seq.num_output_tokens - 1)  # the final token is free
            k = min(k, max_model_len - seq.num_tokens)
            if k < 1:
                continue
            seqs.append(seq)
            ks.append(k)
        if not seqs:
            return
        for seq, spec in zip(seqs, self.proposer.propose(seqs, ks)):
            seq.spec_token_ids = list(spec)

    def observe(self, seq: Sequence, proposed: int, accepted: int) -> None:
        st = seq.spec_state
        if st is None:
            return
        st.acc = self.DECAY * st.acc + accepted
        st.trials = self.DECAY * st.trials + accepted + (accepted < proposed)
        if st.probe:
            st.probe = False
            if accepted:
                st.cooldown = 0  # acceptance is back: proposals pay again
                st.acc, st.trials = max(st.acc, 2.0), max(st.trials, 2.0)  # ... so re-open the estimate

    def step_time(self, sched, seconds: float) -> None:
        """Learn the verification cost from single-sequence decode steps."""
        if len(sched.scheduled) != 1:
            return
        s = sched.scheduled[0]
        if s.num_tokens != 1 + s.num_spec or not s.samples:
            return
        if not s.num_spec:
            self._t_plain = seconds if self._t_plain is None else 0.8 * self._t_plain + 0.2 * seconds
        elif self._t_plain:
            a = (seconds / self._t_plain - 1) / s.num_spec
            self.alpha = min(2.0, max(0.01, 0.8 * self.alpha + 0.2 * a))

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)


def spec_metrics(scheduler) -> dict[str, float]:
    """Acceptance statistics since start (vLLM's spec_decode counters): drafts = verifications of
    one sequence's proposals; mean_acceptance_length = tokens emitted per verification (accepted
    proposals + the target's own token)."""
    d, t, a = scheduler.num_drafts, scheduler.num_draft_tokens, scheduler.num_accepted_tokens
    return {"num_drafts": d, "num_draft_tokens": t, "num_accepted_tokens": a,
            "acceptance_rate": a / t if t else 0.0, "mean_acceptance_length": 1 + a / d if d else 0.0}


def make_spec_decoder(cfg: SpeculativeConfig | None, engine) -> SpecDecoder | None:
    if cfg is None:
        return None
    if cfg.method == "ngram":
        return SpecDecoder(cfg, NgramProposer(cfg))
    from .draft_model import DraftModelProposer  # loads a second model

    return SpecDecoder(cfg, DraftModelProposer(cfg, engine))
