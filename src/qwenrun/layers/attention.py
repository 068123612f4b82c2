"""Attention over a paged KV cache.

A forward pass sees one flat batch of tokens from many sequences. Tokens ``[0, num_decode)`` are
single-token decodes (one per sequence) and are attended in one padded batch; the rest are prefill
spans (a whole prompt or a chunk of one), each attended with a causal mask offset by the tokens
already in the cache. Every token's K/V is written to its cache slot before attention, so a chunk
sees its own keys and all earlier chunks' keys the same way.

Memory: SDPA's CPU and CUDA kernels are blocked (flash-style), so no [T, T] score matrix is ever
materialised, even for a 32K prompt."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    start: int  # index of the span's first token in the flat batch
    num_tokens: int  # query tokens in this step
    context_len: int  # cached tokens before the span + num_tokens
    slots: torch.Tensor | None  # [context_len] cache slots to read; None when nothing is cached before


@dataclass
class DecodeGroup:
    """Decodes attended together: rows [start, end) of the flat batch, padded to one length.
    Decodes are split into groups so that rows x padded length stays within the memory plan's
    gather budget: one long context beside many short ones never pads the short ones to its
    length (which would gather B x L_max K/V rows)."""

    start: int
    end: int
    # [B, L] long: slots of each decode's context (padded); or, for one sequence whose blocks are
    # contiguous in the pool, a slice of them (K/V are then read in place, without a gather).
    slots: torch.Tensor | slice
    lens: torch.Tensor  # [B] long, context incl. the new token

    @property
    def max_len(self) -> int:
        return self.slots.stop - self.slots.start if isinstance(self.slots, slice) else self.slots.shape[1]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: where each token's K/V goes
    num_decode: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSpan] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, g: int, window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] bool: key j is visible to decode b of group g."""
        key = ("decode", g, window)
        if key not in self._masks:
            grp = self.decode_groups[g]
            lens = grp.lens[:, None]  # [B, 1]
            j = torch.arange(grp.max_len, device=lens.device)[None, :]  # [1, L]
            m = j < lens
            if window is not None:
                m &= j > lens - 1 - window
            self._masks[key] = m[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None, device) -> torch.Tensor | None:
        """[q, ctx] bool causal mask of prefill span i, offset by its cached prefix (None = plain causal)."""
        p = self.prefills[i]
        if p.context_len == p.num_tokens and window is None:
            return None
        key = ("prefill", i, window)
        if key not in self._masks:
            qpos = torch.arange(p.context_len - p.num_tokens, p.context_len, device=device)[:, None]
            kpos = torch.arange(p.context_len, device=device)[None, :]
            m = kpos <= qpos
            if window is not None:
                m &= qpos - kpos < window
            self._masks[key] = m
        return self._masks[key]


# Bound on one SDPA call's query rows x keys x heads (keeps kernel scratch small on long prompts).
_MAX_SCORE_ELEMS = 1 << 27


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, cache,
                    layer: int, window: int | None, scale: float) -> torch.Tensor:
    """q: [N, H, d]; k, v: [N, Hkv, d] (post-RoPE). Returns [N, H, d]."""
    cache.write(layer, meta.slot_mapping, k, v)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for g, grp in enumerate(meta.decode_groups):
        qd = q[grp.start:grp.end]
        od = cache.decode_attention(layer, qd, grp.slots, grp.lens, window, scale)
        if od is None:
            # SDPA on the gathered [B, L, Hkv, d] layout: measured 1.5x (GQA) to 8x (MHA, 4B shapes)
            # faster than batched matmuls, which fall off MKL's fast path on the transposed keys.
            kd, vd = cache.read(layer, grp.slots, q.dtype)  # [B, L, Hkv, d]
            od = F.scaled_dot_product_attention(
                qd[:, :, None, :],  # [B, H, 1, d]
                kd.transpose(1, 2), vd.transpose(1, 2),  # [B, Hkv, L, d]
                attn_mask=meta.decode_mask(g, window), scale=scale, enable_gqa=gqa)[:, :, 0, :]
            del kd, vd  # free this group's gather before the next one's
        out[grp.start:grp.end] = od
    prefill_attention(q, k, v, meta, cache, layer, window, scale, out)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, cache,
                      layer: int, window: int | None, scale: float, out: torch.Tensor) -> None:
    """The prefill spans of ``meta``: their rows of ``out`` [N, H, d] (K/V already in the cache)."""
    n_heads = q.shape[1]
    gqa = n_heads != k.shape[1]
    for i, p in enumerate(meta.prefills):
        s, e = p.start, p.start + p.num_tokens
        if p.slots is None:
            kp, vp = k[s:e], v[s:e]  # nothing cached before: attend the fresh keys directly
        else:
            kp, vp = cache.read(layer, p.slots, q.dtype)  # [ctx, Hkv, d]
        kt, vt = kp.transpose(0, 1)[None], vp.transpose(0, 1)[None]  # [1, Hkv, ctx, d]
        mask = meta.prefill_mask(i, window, q.device)
        rows = max(1, _MAX_SCORE_ELEMS // (n_heads * p.context_len))
        for r0 in range(0, p.num_tokens, rows):
            r1 = min(p.num_tokens, r0 + rows)
            qs = q[s + r0:s + r1].transpose(0, 1)[None]  # [1, H, r, d]
            if mask is None and r0 == 0 and r1 == p.num_tokens:
                o = F.scaled_dot_product_attention(qs, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                kend = p.context_len - p.num_tokens + r1  # keys past the last query row are masked anyway
                m = mask[r0:r1, :kend] if mask is not None else _causal_rows(r0, r1, kend, q.device)
                o = F.scaled_dot_product_attention(qs, kt[:, :, :kend], vt[:, :, :kend], attn_mask=m,
                                                   scale=scale, enable_gqa=gqa)
            out[s + r0:s + r1] = o[0].transpose(0, 1)


def _causal_rows(r0: int, r1: int, ctx: int, device) -> torch.Tensor:
    return torch.arange(ctx, device=device)[None, :] <= torch.arange(r0, r1, device=device)[:, None]


def fused_attention(ops, qkv: torch.Tensor, n_heads: int, n_kv: int, rope: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata, cache, layer: int, window: int | None, scale: float) -> torch.Tensor:
    """``paged_attention`` with the fused CPU ops (layers/fused.py), straight from the qkv
    projection's output [N, (H + 2 Hkv) d] (pre-RoPE; rotated in place). Returns [N, H * d].

    RoPE and the KV write are one call; decodes attend the fp32/bf16/fp16 cache in place (no
    gather, no mask tensor; a 16-bit cache under fp32 activations is converted in registers, the
    values the plain path's cache.read gives); an all-decode step with one group is a single call
    per layer. An int8 cache keeps the plain write and attention."""
    n, d = qkv.shape[0], rope.shape[-1]
    window_i = window or 0
    if not fused_cache(cache):
        ops.rope_store_(qkv, rope, positions, n_heads, n_kv, None, 0, None)
        q = qkv[:, :n_heads * d].view(n, n_heads, d)
        k = qkv[:, n_heads * d:(n_heads + n_kv) * d].view(n, n_kv, d)
        v = qkv[:, (n_heads + n_kv) * d:].view(n, n_kv, d)
        return paged_attention(q, k, v, meta, cache, layer, window, scale).view(n, n_heads * d)
    groups = meta.decode_groups
    if not meta.prefills and len(groups) == 1 and groups[0].end - groups[0].start == n:
        slots, start = decode_slot_args(groups[0].slots)
        return ops.decode_step_attention(qkv, rope, positions, cache.data, layer, meta.slot_mapping, slots, start,
                                         groups[0].lens, n_heads, n_kv, window_i, scale)
    ops.rope_store_(qkv, rope, positions, n_heads, n_kv, cache.data, layer, meta.slot_mapping)
    out = torch.empty(n, n_heads * d, dtype=qkv.dtype, device=qkv.device)
    for grp in groups:
        slots, start = decode_slot_args(grp.slots)
        ops.decode_attention_(qkv, cache.data, layer, slots, start, grp.lens, grp.start, n_heads, n_kv, window_i,
                              scale, out)
    if meta.prefills:
        q = qkv[:, :n_heads * d].view(n, n_heads, d)
        k = qkv[:, n_heads * d:(n_heads + n_kv) * d].view(n, n_kv, d)
        v = qkv[:, (n_heads + n_kv) * d:].view(n, n_kv, d)
        prefill_attention(q, k, v, meta, cache, layer, window, scale, out.view(n, n_heads, d))
    return out


_NO_SLOTS = torch.empty(0, dtype=torch.long)
FUSED_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_cache(cache) -> bool:
    """The fused CPU ops read and write this cache in place (any activation dtype they take)."""
    return not cache.quantized and cache.dtype in FUSED_KV_DTYPES


def decode_slot_args(slots: torch.Tensor | slice) -> tuple[torch.Tensor, int]:
    """A decode group's slots as the fused op takes them: a [B, L] tensor, or (empty, first slot)."""
    if isinstance(slots, slice):
        return _NO_SLOTS, slots.start
    return slots.contiguous(), 0
