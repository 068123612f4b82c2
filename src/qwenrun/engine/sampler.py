"""Batched sampling with per-sequence parameters.

Order per row (as transformers' logits processors/warpers, then vLLM's extras):
logit_bias → min_tokens EOS mask → repetition penalty (prompt + output, CTRL style) →
presence/frequency penalties (output counts, OpenAI style) → grammar mask (structured output: the
last word on which tokens may come; only rows with a grammar pay) → greedy argmax, or
temperature → top_k → top_p → min_p → sample.

Sampling uses the exponential race ``argmax(logits/T - log(E))`` with E ~ Exp(1) drawn from the
sequence's own generator, V draws per step whatever the batch holds: a seeded sequence produces the
same tokens alone or next to any neighbours. Logprobs are of the raw model distribution
(log_softmax of the logits before any processing), as vLLM and the OpenAI API report them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import fused
from .sequence import Sequence
from .structured import apply_masks

# top-k candidate window: when every sampled row has top_k <= this, work on topk() candidates
# instead of sorting the whole vocabulary (exact: tokens outside a row's top_k are masked anyway).
_CANDIDATE_WINDOW = 1024


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row, sampled token + top-k, or None


def argmax_ids(logits: torch.Tensor, n: int | None = None) -> list[int]:
    """torch.argmax over the first n columns of each row, as a list (the fused C++ op on CPU:
    ~30 us per 151,936 logits where PyTorch's argmax takes ~300 us on one core)."""
    n = logits.shape[1] if n is None else n
    ops = fused.usable(logits)
    if ops is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 and n > 0:
        return ops.argmax_rows(logits, n)
    return logits[:, :n].argmax(dim=-1).tolist()


def _needs_counts(p) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _plain_greedy(s: Sequence, p) -> bool:
    """Greedy with no logprobs, bias, EOS ban, penalty or grammar: the argmax of the raw logits."""
    return (p.temperature == 0 and p.logprobs is None and not p.logit_bias and s.grammar is None
            and not (p.min_tokens and s.num_output_tokens < p.min_tokens) and not _needs_counts(p))


class Sampler:
    def __init__(self, vocab_size: int, valid_vocab: int | None = None) -> None:
        self.vocab_size = vocab_size
        # Ids at or past the tokenizer's size are embedding padding, never trained: never sample them.
        self.valid_vocab = valid_vocab if valid_vocab and valid_vocab < vocab_size else None

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [B, V] fp32, one row per sequence that samples this step."""
        B, V = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        if all(_plain_greedy(s, p) for s, p in zip(seqs, params)):
            # greedy with nothing to apply: argmax over the valid ids, no copy of the logits
            return SampleResult(argmax_ids(logits, self.valid_vocab), [None] * B)
        want_lp = [p.logprobs is not None for p in params]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        logits = logits.clone()

        for r, (s, p) in enumerate(zip(seqs, params)):
            if p.logit_bias:
                ids = torch.tensor([t for t in p.logit_bias if t < V], dtype=torch.long, device=dev)
                if ids.numel():
                    vals = torch.tensor([p.logit_bias[t] for t in ids.tolist()], dtype=logits.dtype, device=dev)
                    logits[r].index_add_(0, ids, vals)
            if p.min_tokens and s.num_output_tokens < p.min_tokens:
                stops = [t for t in (*(() if p.ignore_eos else s.eos_token_ids), *(p.stop_token_ids or ())) if t < V]
                if stops:
                    logits[r, stops] = float("-inf")
        self._apply_penalties(logits, seqs)
        if self.valid_vocab is not None:
            logits[:, self.valid_vocab:] = float("-inf")
        constrained = [r for r, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            self._apply_grammars(logits, seqs, constrained)

        out = torch.tensor(argmax_ids(logits), dtype=torch.long) if logits.is_cpu else logits.argmax(dim=-1)
        rows = [r for r, p in enumerate(params) if p.temperature != 0]
        if rows:
            out[rows] = self._sample_rows(logits[rows], [seqs[r] for r in rows])
        tokens = out.tolist()  # the step's one host sync (plus logprobs below, when asked)

        lps: list[dict[int, float] | None] = [None] * B
        if raw_lp is not None:
            kmax = max((p.logprobs or 0) for p in params)
            top_v, top_i = raw_lp.topk(kmax, dim=-1) if kmax else (None, None)
            chosen = raw_lp.gather(1, out[:, None])[:, 0].tolist()
            top_v = top_v.tolist() if kmax else None
            top_i = top_i.tolist() if kmax else None
            for r, p in enumerate(params):
                if p.logprobs is None:
                    continue
                d = {}
                if p.logprobs:
                    d.update(zip(top_i[r][:p.logprobs], top_v[r][:p.logprobs]))
                d[tokens[r]] = chosen[r]
                lps[r] = d
        return SampleResult(tokens, lps)

    @staticmethod
    def _apply_grammars(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        # No conflict with min_tokens' EOS ban: a grammar that allows only EOS has stopped, and a
        # stopped grammar has already ended its sequence (Sequence.check_token_stop).
        apply_masks(logits, rows, [seqs[r].grammar for r in rows])

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [r for r, s in enumerate(seqs) if _needs_counts(s.params)]
        if not rows:
            return
        V, dev = logits.shape[1], logits.device
        for r in rows:
            s, p = seqs[r], seqs[r].params
            row = logits[r]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted({t for t in s.token_ids if t < V}), dtype=torch.long, device=dev)
                if seen.numel():
                    vals = row[seen]
                    row[seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.num_output_tokens:
                out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=dev)
                counts = torch.bincount(out_ids, minlength=V)[:V].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [R, V] processed logits of rows that sample; returns [R] token ids."""
        R, V = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)[:, None]
        logits = logits / temp
        ks = [p.top_k if p.top_k and p.top_k > 0 else V for p in params]
        needs_filter = any(k < V for k in ks) or any(p.top_p < 1.0 for p in params) or any(p.min_p > 0 for p in params)
        # Candidates: [R, C] values sorted descending, and their vocabulary ids.
        if not needs_filter:
            cand_v, cand_i = logits, None
        elif max(ks) <= _CANDIDATE_WINDOW:
            cand_v, cand_i = logits.topk(max(ks), dim=-1)
        else:
            cand_v, cand_i = logits.sort(dim=-1, descending=True)
        if needs_filter:
            C = cand_v.shape[1]
            pos = torch.arange(C, device=dev)[None, :]
            k_t = torch.tensor(ks, device=dev)[:, None]
            cand_v = cand_v.masked_fill(pos >= k_t, float("-inf"))  # top_k
            top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)[:, None]
            if (top_p < 1).any():
                probs = cand_v.softmax(dim=-1)
                # drop a token when the mass strictly before it already reaches top_p (keeps >= 1)
                before = probs.cumsum(dim=-1) - probs
                cand_v = cand_v.masked_fill(before >= top_p, float("-inf"))
            min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)[:, None]
            if (min_p > 0).any():
                probs = cand_v.softmax(dim=-1)
                cand_v = cand_v.masked_fill(probs < min_p * probs[:, :1], float("-inf"))
        # Exponential race with each row's own generator: V draws per row per step, always.
        noise = torch.empty(R, V, dtype=torch.float32, device=dev)
        for r, s in enumerate(seqs):
            noise[r].exponential_(generator=s.generator)
        if cand_i is not None:
            noise = noise.gather(1, cand_i)
        scores = cand_v - noise.clamp_(min=torch.finfo(torch.float32).tiny).log()
        choice = scores.argmax(dim=-1)
        return choice if cand_i is None else cand_i.gather(1, choice[:, None])[:, 0]
