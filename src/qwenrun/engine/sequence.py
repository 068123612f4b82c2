"""Sequence: one stream of tokens the engine computes (a request with n > 1 owns n of them).

The scheduler speaks tokens, not phases: a sequence has ``num_tokens`` (prompt + generated) and
``num_computed_tokens`` whose KV is in the cache; each step computes some of the difference.
Prefill, chunked prefill, prefix-cache hits, decode and recompute after preemption are one path."""
from __future__ import annotations

import itertools
from enum import Enum
from typing import Any

from ..sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), max_model_len: int | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + generated
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at the last admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.block_hashes: list[int] = []  # chained hash of each hashed block
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.wait_for: Sequence | None = None  # n > 1: siblings wait for the first one's prompt
        self.generator: Any = None  # torch.Generator for sampling (owned by the runner)
        self.seed: int | None = None
        self.logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, float] | None] = []
        self.num_preemptions = 0
        self.user_data: Any = None  # the output processor's per-sequence state
        # structured output: the grammar matcher (engine/structured.py), advanced by append_token
        # alone. Preemption keeps the tokens (recompute), so the state never needs rolling back.
        self.grammar: Any = None
        # speculative decoding: the tokens proposed for this step (verified, never appended
        # unverified) and the proposer's per-sequence state (engine/spec_decode.py)
        self.spec_token_ids: list[int] = []
        self.spec_state: Any = None

    # -- token accounting -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are a property of the request: only its first sample computes them."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < self.prompt_len)

    def blocked(self) -> bool:
        """True while this sequence should wait for a sibling to fill the shared prompt blocks."""
        w = self.wait_for
        if w is None:
            return False
        if w.is_finished or w.num_computed_tokens >= w.prompt_len:
            self.wait_for = None
            return False
        return True

    def append_token(self, token_id: int, logprob: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.cumulative_logprob += logprob[token_id]
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def drop_last_tokens(self, n: int) -> None:
        """Take back the last n generated tokens (a stop string matched before them in a
        speculative run). Only for a sequence that is finishing: its KV and grammar are not rolled back."""
        if n <= 0:
            return
        assert n <= self.num_output_tokens
        del self.token_ids[-n:]
        if self.logprobs:
            del self.logprobs[-n:]
            total = 0.0  # summed again in order: the same float as plain decoding's running sum
            for tok, lp in zip(self.output_token_ids, self.logprobs):
                total += lp[tok]
            self.cumulative_logprob = total

    def check_token_stop(self) -> bool:
        """Stop conditions decided by the last token alone: EOS, stop_token_ids, max_tokens, context.
        Stop strings need text and are checked by the output processor."""
        p = self.params
        n_out = self.num_output_tokens
        last = self.token_ids[-1]
        if n_out >= max(p.min_tokens, 1):
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if p.stop_token_ids and last in p.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", last
                return True
        if self.grammar is not None and self.grammar.terminated:
            # the grammar is complete and nothing may follow: a natural end, as EOS would be
            self.finish_reason, self.stop_reason = "stop", None
            return True
        if p.max_tokens is not None and n_out >= p.max_tokens:
            self.finish_reason = "length"
            return True
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"
            return True
        return False

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})")
