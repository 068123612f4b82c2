"""The paged KV pool: one tensor holding K and V for every layer, block and slot.

Layout [layers, 2, num_slots, kv_heads, head_dim] with num_slots = num_blocks * block_size, so a
token's K/V lives at one flat slot index in every layer. Storage is the model dtype, or int8 (fp8
e4m3 on CUDA) with one fp32 scale per token and head: symmetric absmax, written once at store time
and applied on read."""
from __future__ import annotations

import torch

_QMAX = {torch.int8: 127.0}
if hasattr(torch, "float8_e4m3fn"):
    _QMAX[torch.float8_e4m3fn] = 448.0


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, kv_cache_dtype)
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "fp8":
        if device.type != "cuda":
            raise ValueError("kv_cache_dtype='fp8' needs a CUDA device; use 'int8' on CPU")
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")


# Channels sharing one scale: 32, as llama.cpp's q8_0 KV blocks. Qwen2 keys carry outlier channels
# (|k| up to ~160 next to a median of ~2 in the demo model's early layers); groups of 32 cut the
# relative error from 0.85-1.26% (one scale per head) to 0.70-1.03% for 12.5% more scale memory.
KV_SCALE_GROUP = 32


def scale_group(head_dim: int) -> int:
    return KV_SCALE_GROUP if head_dim % KV_SCALE_GROUP == 0 else head_dim


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Pool bytes one token of context costs (K and V, all layers, scales included)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per = 2 * num_layers * kv_heads * head_dim * elem
    if dtype in _QMAX:
        per += 2 * num_layers * kv_heads * (head_dim // scale_group(head_dim)) * 4  # fp32 scales
    return per


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots = num_blocks * block_size
        self.dtype = dtype
        self.quantized = dtype in _QMAX
        # torch.empty: pages are committed as they are first written (fast start on CPU). No slot is
        # ever read before it is written: contexts only cover written positions, and padded decode
        # lanes point at the step's own freshly written slot (see ModelRunner._decode_slots).
        self.data = torch.empty(num_layers, 2, self.num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.group = scale_group(head_dim)
        self.scales = (torch.empty(num_layers, 2, self.num_slots, kv_heads, head_dim // self.group, 1,
                                   dtype=torch.float32, device=device) if self.quantized else None)

        # int8 on CPU: decode attends the int8 rows directly (csrc/kv_attention.cpp), no dequantized copy
        self._fused_ops = None
        if dtype == torch.int8 and torch.device(device).type == "cpu":
            from ..quant import kernels

            self._fused_ops = kernels.ops()

    def decode_attention(self, layer: int, q: torch.Tensor, slots: torch.Tensor | slice, lens: torch.Tensor,
                         window: int | None, scale: float) -> torch.Tensor | None:
        """Attention of one query per sequence straight over the int8 cache: q [B, H, d] →
        [B, H, d]. None when this cache has no fused kernel (the caller gathers and uses SDPA)."""
        if self._fused_ops is None:
            return None
        if isinstance(slots, slice):
            slots = torch.arange(slots.start, slots.stop)[None]
        s, h, g = self.num_slots, self.data.shape[3], self.scales.shape[4]
        out = self._fused_ops.int8kv_decode_attention(
            q.float().contiguous(), self.data[layer, 0], self.data[layer, 1], self.scales[layer, 0].view(s, h, g),
            self.scales[layer, 1].view(s, h, g), slots, lens, window or 0, scale)
        return out.to(q.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, Hkv, d] for the tokens at ``slots`` [N]."""
        if not self.quantized:
            self.data[layer, 0].index_copy_(0, slots, k.to(self.dtype))
            self.data[layer, 1].index_copy_(0, slots, v.to(self.dtype))
            return
        qmax = _QMAX[self.dtype]
        n, h, d = k.shape
        for i, x in ((0, k), (1, v)):
            x32 = x.float().view(n, h, d // self.group, self.group)
            scale = (x32.abs().amax(dim=-1, keepdim=True) / qmax).clamp_(min=1e-8)  # [N, Hkv, d/G, 1]
            q = x32 / scale
            q = q.round_().clamp_(-qmax, qmax).to(self.dtype) if self.dtype == torch.int8 else q.to(self.dtype)
            self.data[layer, i].index_copy_(0, slots, q.view(n, h, d))
            self.scales[layer, i].index_copy_(0, slots, scale)

    def read(self, layer: int, slots: torch.Tensor | slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather K and V at ``slots`` (any shape S) → two [*S, Hkv, d] tensors in ``dtype``.
        A ``slice`` of consecutive slots reads in place: [1, L, Hkv, d] views, no copy."""
        if isinstance(slots, slice):
            k, v = self.data[layer, 0, slots], self.data[layer, 1, slots]
            if self.quantized:
                m, h, d = k.shape
                g = (m, h, d // self.group, self.group)
                k = (k.to(torch.float32).view(g) * self.scales[layer, 0, slots]).view(m, h, d)
                v = (v.to(torch.float32).view(g) * self.scales[layer, 1, slots]).view(m, h, d)
            return k.to(dtype)[None], v.to(dtype)[None]
        flat = slots.reshape(-1)
        shape = (*slots.shape, *self.data.shape[-2:])
        k = self.data[layer, 0].index_select(0, flat)
        v = self.data[layer, 1].index_select(0, flat)
        if self.quantized:
            m, h, d = k.shape
            g = (m, h, d // self.group, self.group)
            k = k.to(torch.float32).view(g).mul_(self.scales[layer, 0].index_select(0, flat)).view(m, h, d)
            v = v.to(torch.float32).view(g).mul_(self.scales[layer, 1].index_select(0, flat)).view(m, h, d)
        return k.to(dtype).view(shape), v.to(dtype).view(shape)
