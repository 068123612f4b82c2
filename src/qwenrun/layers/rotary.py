"""Rotary position embedding, GPT-NeoX "rotate half" layout, as transformers' Qwen2 does it.

The angle table is built once for every position up to max_position_embeddings. Angles are formed
the way the reference forms them (fp32 inverse frequencies times fp32 positions, i.e. the product
correctly rounded to fp32), so results match it at position 32767 too; cos/sin are then cast to the
activation dtype before use, again as the reference does."""
from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    # [head_dim/2] fp32, same expression as transformers' default rope init.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_table(head_dim: int, theta: float, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """[max_positions, 2, head_dim] fp32: cos and sin of cat(freqs, freqs)."""
    inv = inv_frequencies(head_dim, theta).double()
    pos = torch.arange(max_positions, dtype=torch.float64)
    # fp64 product rounded once to fp32 == fp32 multiply of the fp32 operands (correctly rounded).
    freqs = torch.outer(pos, inv).float()  # [P, d/2]
    emb = torch.cat((freqs, freqs), dim=-1).double()  # [P, d]
    return torch.stack((emb.cos(), emb.sin()), dim=1).float().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, d]; cos/sin: [N, 1, d] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
