"""ModelRunner: SchedulerOutput → one forward over a flat token batch → sampled tokens.

Batch order: single-token steps (decodes) first, attended together in one padded batch, then
multi-token spans (prefill chunks, and a decoding sequence's last token followed by the tokens
proposed for it: speculative decoding's verification is a short span like a prefill chunk). The
LM head runs only on rows that need logits: each sampling sequence's last token (and its proposed
tokens), and prompt positions of requests that asked for prompt_logprobs. Proposals are verified
in engine/spec_decode.py; a step returns a list of tokens per sequence."""
from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata, DecodeGroup, PrefillSpan
from .kv_cache import KVCache
from .sampler import Sampler
from .scheduler import ScheduledSeq, SchedulerOutput
from .sequence import Sequence
from .spec_decode import verify

_PROMPT_LOGPROB_ROWS = 256  # LM-head rows per chunk for prompt_logprobs ([rows, V] fp32 each)


class ModelRunner:
    def __init__(self, model, cache: KVCache, sampler: Sampler, device: torch.device,
                 decode_gather_tokens: int | None = None) -> None:
        self.model = model
        # decode rows x padded context per attention group (the memory plan's gather budget)
        self.decode_gather_tokens = decode_gather_tokens
        self.cache = cache
        self.sampler = sampler
        self.device = device
        self.block_size = cache.block_size
        self.num_forward_tokens = 0  # statistics
        self.num_steps = 0
        self.max_batch_seqs = 0

    def _slot(self, seq: Sequence, pos: int) -> int:
        """The cache slot of position pos of seq."""
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """[end-start] cache slots of positions start..end-1 of seq."""
        bs = self.block_size
        if end - start == 1:  # a decode: one slot, computed here rather than by five tensor ops
            return torch.tensor([self._slot(seq, start)], dtype=torch.long)
        bt = torch.tensor(seq.block_table[start // bs:(end - 1) // bs + 1], dtype=torch.long)
        pos = torch.arange(start, end)
        return bt[(pos // bs) - start // bs] * bs + pos % bs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[int, list[tuple[int, dict[int, float] | None]]]:
        """Run one step; returns {seq_id: [(token, logprobs or None), ...]} for every sequence
        that samples: the accepted proposals, then the target model's own next token."""
        dev = self.device
        # decodes first, shortest context first (so decode groups pad little), then prefill spans
        items = sorted(sched.scheduled, key=lambda s: (s.num_tokens > 1, s.start if s.num_tokens == 1 else 0))
        decodes = [s for s in items if s.num_tokens == 1]
        if len(decodes) == len(items):
            # decodes only (the steady state): ids, positions and slots as one tensor. The step
            # runs right after the weights streamed through the caches, where each tensor op costs
            # ~8 us in misses; this path makes 1 instead of 2 per sequence + 3.
            t = torch.tensor([[s.seq.token_ids[s.start] for s in items], [s.start for s in items],
                              [self._slot(s.seq, s.start) for s in items]], dtype=torch.long)
            ids_t, positions, slot_mapping = t[0], t[1], t[2]
        else:
            ids: list[int] = []
            pos_parts, slot_parts = [], []
            for s in items:
                ids.extend(s.seq.token_ids[s.start:s.start + s.num_tokens - s.num_spec])
                ids.extend(s.spec)
                pos_parts.append(torch.arange(s.start, s.start + s.num_tokens))
                slot_parts.append(self._slots(s.seq, s.start, s.start + s.num_tokens))
            positions = torch.cat(pos_parts)
            slot_mapping = torch.cat(slot_parts)
            ids_t = torch.tensor(ids, dtype=torch.long)
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(dev), num_decode=len(decodes))
        for g0, g1 in self._decode_groups(decodes):
            slots, lens = self._decode_slots(decodes[g0:g1], slot_mapping[g0:g1])
            meta.decode_groups.append(DecodeGroup(g0, g1, slots, lens))
        offset = len(decodes)
        for s in items[len(decodes):]:
            ctx = s.start + s.num_tokens
            slots = self._slots(s.seq, 0, ctx).to(dev) if s.start > 0 else None
            meta.prefills.append(PrefillSpan(offset, s.num_tokens, ctx, slots))
            offset += s.num_tokens

        input_ids = ids_t.to(dev)
        hidden = self.model(input_ids, positions.to(dev), meta, self.cache)  # [N, D]
        self.num_forward_tokens += input_ids.numel()
        self.num_steps += 1
        self.max_batch_seqs = max(self.max_batch_seqs, len(items))

        # Rows to sample: the last token of every sequence that finishes its pending tokens, and
        # the proposed tokens after it.
        sample_rows, sample_items, offset = [], [], 0
        for s in items:
            if s.samples:
                last = offset + s.num_tokens - 1
                sample_rows.extend(range(last - s.num_spec, last + 1))
                sample_items.append(s)
            if s.seq.wants_prompt_logprobs:
                self._prompt_logprobs(s, hidden[offset:offset + s.num_tokens])
            offset += s.num_tokens
        if not sample_rows:
            return {}
        if len(sample_rows) == hidden.shape[0]:  # every row samples (rows are in order): no gather
            logits = self.model.compute_logits(hidden)
        else:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, rows))  # [rows, V] fp32
        for s in sample_items:
            seq = s.seq
            if seq.generator is None and seq.params.temperature != 0:
                seq.generator = torch.Generator(device=dev)
                seq.generator.manual_seed(seq.seed if seq.seed is not None else 0)
        return verify(self.sampler, logits, [(s.seq, s.spec) for s in sample_items])

    def _decode_groups(self, decodes: list[ScheduledSeq]) -> list[tuple[int, int]]:
        """Split decodes (sorted by context length) into runs whose rows x longest context fit
        the gather budget; a context longer than the budget alone is a group of its own."""
        budget = self.decode_gather_tokens
        if not decodes:
            return []
        if budget is None:
            return [(0, len(decodes))]
        groups, g0 = [], 0
        for i, s in enumerate(decodes):
            if i > g0 and (i - g0 + 1) * (s.start + 1) > budget:
                groups.append((g0, i))
                g0 = i
        groups.append((g0, len(decodes)))
        return groups

    def _decode_slots(self, decodes: list[ScheduledSeq], new_slots: torch.Tensor):
        """[B, L] slots of every decode's context (padding repeats the new token's slot, which
        holds real data, so masked lanes never see uninitialised memory) and [B] context lengths."""
        bs = self.block_size
        lens = torch.tensor([s.start + 1 for s in decodes], dtype=torch.long)
        max_len = int(lens.max())
        nblk = -(-max_len // bs)
        if len(decodes) == 1:  # single stream: blocks usually sit back to back in the pool
            table = decodes[0].seq.block_table[:nblk]
            if table[-1] - table[0] == nblk - 1 and table == list(range(table[0], table[0] + nblk)):
                return slice(table[0] * bs, table[0] * bs + max_len), lens.to(self.device)
        bt = torch.zeros(len(decodes), nblk, dtype=torch.long)
        for b, s in enumerate(decodes):
            table = s.seq.block_table[:nblk]
            bt[b, :len(table)] = torch.tensor(table, dtype=torch.long)
        slots = (bt[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)[:, :max_len]  # [B, L]
        j = torch.arange(max_len)[None, :]
        slots = torch.where(j < lens[:, None], slots, new_slots[:, None])
        return slots.to(self.device), lens.to(self.device)

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (first token: None)."""
        seq, k = s.seq, s.seq.params.prompt_logprobs
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        # Position p predicts token p+1; only prompt tokens are scored.
        end = min(s.start + s.num_tokens, seq.prompt_len - 1)
        first = max(s.start, len(seq.prompt_logprobs) - 1)  # a recompute after preemption skips done rows
        for r0 in range(first, end, _PROMPT_LOGPROB_ROWS):
            r1 = min(end, r0 + _PROMPT_LOGPROB_ROWS)
            lp = torch.log_softmax(self.model.compute_logits(hidden[r0 - s.start:r1 - s.start]), dim=-1)
            nxt = torch.tensor(seq.token_ids[r0 + 1:r1 + 1], dtype=torch.long, device=lp.device)
            chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
            if k:
                tv, ti = lp.topk(k, dim=-1)
                tv, ti = tv.tolist(), ti.tolist()
            for r in range(r1 - r0):
                d = dict(zip(ti[r], tv[r])) if k else {}
                d[int(nxt[r])] = chosen[r]
                seq.prompt_logprobs.append(d)
