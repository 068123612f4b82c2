"""Continuous-batching scheduler (pure Python, no torch).

Each step has a token budget. Running sequences go first (decodes cost one token; an unfinished
prefill takes what the budget leaves, i.e. chunked prefill), then waiting sequences are admitted in
arrival order, each first matched against the prefix cache. When blocks run out, the most recently
admitted running sequence is preempted by recompute: its blocks are freed and it returns to the
front of the queue with its tokens kept, to be prefilled again later (mostly from the prefix
cache). Nothing here can run out of memory: every allocation is checked first.

Speculative decoding rides on the same step: a decoding sequence with proposed tokens
(``seq.spec_token_ids``) is scheduled for its last token plus the proposals, as far as the budget
and the free blocks allow (proposals never preempt anyone; they shrink to fit, down to none).
``update`` appends the accepted tokens one by one, checking stops at each, and gives back the
blocks of the rejected ones. Plain decoding is the case with no proposals."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed_tokens at scheduling)
    num_tokens: int  # tokens computed this step, proposed ones included
    spec: list[int] = field(default_factory=list)  # proposed tokens after the sequence's last one

    @property
    def num_spec(self) -> int:
        return len(self.spec)

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, so a new token is sampled."""
        return self.start + self.num_tokens - len(self.spec) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """All the model runner reads for one step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # speculative decoding statistics (vLLM's spec_decode_* counters)
        self.num_drafts = 0  # verifications of one sequence's proposals
        self.num_draft_tokens = 0  # tokens proposed and verified
        self.num_accepted_tokens = 0  # of those, accepted by the target model
        self.on_finish = None  # called with each sequence as it ends (the draft model frees its KV)

    # -- queue --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_needed(seq.num_tokens + 1)
        if need > self.bm.num_blocks:
            raise ValueError(f"a {seq.num_tokens}-token request needs {need} KV blocks but the pool "
                             f"holds {self.bm.num_blocks}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End a sequence (stop, length or abort) and release its blocks; idempotent."""
        if seq.is_finished:
            return
        seq.finish_reason = seq.finish_reason if reason is None else reason
        if stop_reason is not None:
            seq.stop_reason = stop_reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        if self.on_finish is not None:
            self.on_finish(seq)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # preempted itself: nothing more fits this step
            spec = self._fit_spec(seq, n, budget - n)
            self.bm.allocate(seq, n + len(spec))
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n + len(spec), spec))
            budget -= n + len(spec)
            i += 1
        if out.preempted:
            return out  # memory is tight: admit nobody new this step
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.blocked():  # an n>1 sibling waiting for the shared prompt blocks
                skipped.append(self.waiting.popleft())
                continue
            hits = self.bm.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            base = len(hits) * self.bm.block_size if hits else seq.num_computed_tokens
            n = min(seq.num_tokens - base, budget)
            if not self.bm.can_allocate(seq, n, hits):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, n, hits)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return out

    def _fit_spec(self, seq: Sequence, n: int, budget: int) -> list[int]:
        """The proposals of a decoding sequence that fit this step's budget and free blocks."""
        spec = seq.spec_token_ids
        if not spec:
            return []
        seq.spec_token_ids = []
        if n != seq.num_tokens - seq.num_computed_tokens or n != 1:
            return []  # only a sequence with just its last token pending verifies proposals
        k = min(len(spec), budget)
        while k and not self.bm.can_allocate(seq, n + k):
            k -= 1
        return spec[:k]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.spec_token_ids = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, sampled: dict) -> list[tuple[Sequence, list[int]]]:
        """Advance computed-token counts, append sampled tokens and finish sequences that hit a
        token-level stop. ``sampled``: seq_id -> a token, or a list of (token, logprobs or None):
        the accepted proposals then the target model's own next token. Stops are checked after
        each token; tokens past a stop are dropped. Returns (sequence, its new tokens) for every
        sequence that got any."""
        now = time.monotonic()
        got_token = []
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            new = sampled.get(seq.seq_id)
            if new is None:
                seq.num_computed_tokens = s.start + s.num_tokens - s.num_spec
                self.bm.commit(seq)
                continue
            if isinstance(new, int):
                new = [(new, None)]
            if s.num_spec:
                accepted = len(new) - 1  # the last token is the target model's own
                self.num_drafts += 1
                self.num_draft_tokens += s.num_spec
                self.num_accepted_tokens += accepted
            else:
                accepted = 0
            # KV is valid for the scheduled real tokens and the accepted proposals
            seq.num_computed_tokens = s.start + s.num_tokens - s.num_spec + accepted
            added, stopped = [], False
            for tok, lp in new:
                seq.append_token(tok, lp)
                added.append(tok)
                if seq.check_token_stop():
                    stopped = True
                    break
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
            if s.num_spec:
                self.bm.truncate(seq, seq.num_tokens)  # the rejected proposals' slots
            self.bm.commit(seq)
            seq.last_token_time = now
            got_token.append((seq, added))
            if stopped:
                self.finish(seq, None)
        return got_token
