"""GGUF's block-quantized weights at the file's own precision: no dense copy, no second rounding.

Each GGUF tensor (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) is repacked, losslessly and
with torch byte ops only, into the one layout ``csrc/gguf_kernels.cpp`` reads:

    w[o, k] = (d[o, s] * sc[o, g]) * (u[o, k] - zp) - dm[o, s] * mn[o, g]

with s = k // S (super-block), g = k // G (group), ``sc`` absent = 1 and ``dm``/``mn`` absent = 0.
``u`` is kept in the kernels' interleaved order (``_sigma``: each full group of 8 G weights is
reordered by 4-byte words so that one vector lane holds one scale group; the tail stays) and in
``bits``: 8 = int8 [O, K]; 4 = nibbles [O, K/2] (per 64 stored values, low nibble i = value i,
high = 32 + i, GGUF's Q4_K byte order); 5 and 6 = those nibbles plus a high-bit plane ``qh`` (5:
per group 32 bytes, bit v of byte p = bit 4 of value 32 v + p, then a 32-bit word per 32 values of
the plain rest (``_plane5``); 6: per 128 values 32 bytes, bits 2c..2c+1 of byte i = bits 4-5 of
value 32c + i, as Q6_K).
``zp`` is Q6_K's zero point 32 (else 0). ``d``/``dm`` are GGUF's fp16 scales as stored and
``sc``/``mn`` its integer sub-scales; the fp32 products are exactly those
``gguf.quants.dequantize`` computes.

=======  =========  ====  ===  ============================  ===============
format   bits       S     G    sc / offset                   bits per weight
=======  =========  ====  ===  ============================  ===============
Q8_0     8          32    32   - / -                         8.5  (file 8.5)
Q5_0     5          32    32   - / dm = d, mn = 16           6.25 (file 5.5)
Q5_1     5          32    32   - / dm = -m, mn = 1           6.25 (file 6)
Q4_0     4          32    32   - / dm = d, mn = 8            5.25 (file 4.5)
Q4_1     4          32    32   - / dm = -m, mn = 1           5.25 (file 5)
Q4_K     4          256   32   6-bit sc / dmin, 6-bit m      4.625 (file 4.5)
Q5_K     5          256   32   6-bit sc / dmin, 6-bit m      5.625 (file 5.5)
Q6_K     6, zp 32   256   16   int8 sc / -                   6.56 (file 6.56)
=======  =========  ====  ===  ============================  ===============

Rows that are not a multiple of 64 keep 4- and 5-bit formats in int8 storage (same values)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from . import kernels
from .linear import KERNEL_MAX_ROWS, KernelSwitch, _QuantLinear, _tile_buffer

NATIVE_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class BlockWeight:
    """One GGUF weight in the kernels' layout (see the module doc)."""

    qtype: str
    shape: tuple[int, int]  # (O, K)
    q: torch.Tensor
    qh: torch.Tensor | None  # high-bit plane (bits 5, 6)
    d: torch.Tensor  # fp16
    sc: torch.Tensor | None
    dm: torch.Tensor | None  # fp16
    mn: torch.Tensor | None
    G: int
    S: int
    bits: int
    zp: int = 0
    # per row, whether q holds -128 (Q8_0, found by the C++ repacker in the same pass); None: not known
    rows_m128: torch.Tensor | None = None

    @property
    def nib(self) -> bool:
        """q holds nibbles (4-, 5- and 6-bit storage)."""
        return self.bits != 8

    @property
    def kernel_ok(self) -> bool:
        """The integer kernel's sign trick cannot represent -128 (only Q8_0 can hold it)."""
        if self.nib or self.qtype != "Q8_0":
            return True
        if self.rows_m128 is not None:
            return not bool(self.rows_m128.any())
        return int(self.q.min()) > -128  # one pass, no temporary

    def buffers(self) -> dict[str, torch.Tensor | None]:
        return {"q": self.q, "qh": self.qh, "d": self.d, "sc": self.sc, "dm": self.dm, "mn": self.mn}

    def kernel_args(self) -> tuple:
        """The buffers and geometry as ``bq_linear`` / ``bq_dequant`` take them (after x / before r0)."""
        return (self.q, self.qh, self.d, self.sc, self.dm, self.mn, self.G, self.S, self.bits, self.zp)

    def linear(self, bias: torch.Tensor | None = None) -> "GGUFLinear":
        return GGUFLinear(self, bias)

    def embedding(self, dtype: torch.dtype) -> "GGUFEmbedding":
        return GGUFEmbedding(self, dtype)


# -- repacking (torch byte ops, vectorized over all blocks of a tensor; numpy's strided copies are
# ~15x slower on these layouts: 22 s vs 1.4 s for a 4B model's Q8_0 embedding) -------------------
def _f16(x: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes → [...] fp16."""
    return x.contiguous().view(torch.float16)[..., 0]


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """Q4_0/Q5_0 byte order: [..., 16] bytes → [..., 32] values (low nibbles first)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes (a little-endian 32-bit word of high bits) → [..., 32] bits (0/1)."""
    word = qh.contiguous().view(torch.int32)  # [..., 1]; arithmetic >> then & 1 reads bit 31 too
    return ((word >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)


def _to_nib_layout(vals: torch.Tensor) -> torch.Tensor:
    """[O, K] values 0..15 → [O, K/2] bytes: per 64 weights, low nibble i = weight i, high = 32 + i."""
    O, K = vals.shape
    v = vals.reshape(O, K // 64, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(O, K // 2)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes per super-block → 8 six-bit scales and 8 six-bit mins (ggml's packing:
    bytes 0-3 scales 0-3 (+2 high bits of 4-7), 4-7 mins 0-3 (+2 high bits), 8-11 low nibbles of 4-7)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


@lru_cache(maxsize=None)
def _sigma_words(G: int, U: int = 8) -> torch.Tensor:
    """Stored word m of a group of U units of G values <- weight word (csrc sigma_word)."""
    m = torch.arange(U * G // 4)
    v, j, P = m // 8, m % 8, U // 2
    return (2 * (j % P) + v % 2) * (G // 4) + (8 // P) * (v // 2) + j // P


@lru_cache(maxsize=None)
def _q4k_words() -> torch.Tensor:
    """Q4_K: stored word 8k + 4jj + t of a super-block's 128 nibble bytes <- file word 8t + 2k + jj."""
    k, jj, t = torch.meshgrid(torch.arange(4), torch.arange(2), torch.arange(4), indexing="ij")
    return (8 * t + 2 * k + jj).reshape(32)


@lru_cache(maxsize=None)
def _sigma(K: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The interleaved order of ``csrc/gguf_kernels.cpp`` (see bq_group): stored value m of a row is
    weight sigma[m]; full groups of 8 G (and, for G = 32, a last half group of 4 G) are reordered
    in 4-byte words, the rest stays. Returns (sigma, its inverse)."""
    def local(U: int) -> torch.Tensor:
        return (_sigma_words(G, U)[:, None] * 4 + torch.arange(4)).reshape(U * G)

    R = 8 * G
    ng = K // R
    parts = [(torch.arange(ng)[:, None] * R + local(8)).reshape(-1)]
    at = ng * R
    if G == 32 and K - at >= 4 * G:
        parts.append(at + local(4))
        at += 4 * G
    sigma = torch.cat(parts + [torch.arange(at, K)])
    return sigma, torch.argsort(sigma)


def _interleave(u: torch.Tensor, G: int) -> torch.Tensor:
    """[O, K] values in weight order -> the kernels' stored order."""
    return u.index_select(1, _sigma(u.shape[1], G)[0])


def _store(u: torch.Tensor, bits: int, G: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[O, K] integers (weight order; uint8 for 4/5/6 bits, int8 for 8) -> (q, qh) in ``bits``
    storage, interleaved."""
    O, K = u.shape
    us = _interleave(u, G)
    if bits == 8:
        return us, None
    q = _to_nib_layout(us & 15)
    if bits == 4:
        return q, None
    if bits == 5:
        return q, _plane5((us >> 4) & 1)
    # 6: per 128 stored values, bits 2c..2c+1 of byte i = bits 4-5 of value 32 c + i
    h2 = ((us >> 4) & 3).reshape(O, K // 128, 4, 32) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return q, h2.sum(2, dtype=torch.uint8).reshape(O, K // 4)


def _plane5_split(K: int) -> tuple[int, int, int]:
    """5-bit planes: (values in full groups of 256, values in a half group of 128, rest)."""
    full = K // 256 * 256
    half = 128 if K - full >= 128 else 0
    return full, half, K - full - half


def _plane5(hb: torch.Tensor) -> torch.Tensor:
    """[O, K] bits (stored order) -> the 5-bit plane: per group of 256 (or half group of 128)
    32 bytes, bit v of byte p = value 32 v + p; then per 32 values of the rest a little-endian
    word, bit i = value i."""
    O, K = hb.shape
    full, half, rest = _plane5_split(K)
    parts = []
    if full:
        g = hb[:, :full].reshape(O, full // 256, 8, 32) << torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
        parts.append(g.sum(2, dtype=torch.uint8).reshape(O, -1))
    if half:
        g = hb[:, full:full + 128].reshape(O, 4, 32) << torch.arange(4, dtype=torch.uint8).view(1, 4, 1)
        parts.append(g.sum(1, dtype=torch.uint8))
    if rest:
        w = hb[:, full + half:].reshape(O, rest // 8, 8) << torch.arange(8, dtype=torch.uint8)
        parts.append(w.sum(-1, dtype=torch.uint8))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous()


def _unplane5(qh: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of _plane5: [rows, bytes] -> [rows, K] bits."""
    rows = qh.shape[0]
    full, half, rest = _plane5_split(K)
    parts, at = [], 0
    if full:
        n = full // 8
        g = qh[:, at:at + n].reshape(rows, full // 256, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
        parts.append((g & 1).reshape(rows, full))
        at += n
    if half:
        g = qh[:, at:at + 32].reshape(rows, 1, 32) >> torch.arange(4, dtype=torch.uint8).view(1, 4, 1)
        parts.append((g & 1).reshape(rows, 128))
        at += 32
    if rest:
        w = qh[:, at:at + rest // 8].reshape(rows, rest // 8, 1) >> torch.arange(8, dtype=torch.uint8)
        parts.append((w & 1).reshape(rows, rest))
    return torch.cat(parts, 1)


def _bytes(raw) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # a read-only mmap: only read here, every output is a new tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(raw, dtype=np.uint8))


def pack(qtype: str, raw, shape: tuple[int, int] | list[int], use_kernels: bool = True) -> BlockWeight:
    """Raw GGUF tensor bytes of ``qtype`` for an [O, K] weight → BlockWeight (lossless). Q8_0, Q4_K,
    Q5_0/Q5_1 (rows of a multiple of 64) and Q6_K go through the C++ repackers when the kernels are built (``use_kernels``), else
    (and for the other formats) through torch ops giving the same bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    O, K = int(shape[0]), int(shape[1])
    block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    if K % block:
        raise ValueError(f"{qtype} rows must be a multiple of {block} weights, got {K}")
    nb = K // block
    src = _bytes(raw)
    b = src.view(O, nb, tsize)
    sc = dm = mn = qh = m128 = None
    G, S, bits, zp = 32, block, 8, 0
    i8 = torch.int8
    ops = kernels.ops() if use_kernels else None
    if qtype == "Q8_0":
        if ops is not None:  # one pass over the mapped blocks: values permuted, fp16 d split off
            q, head, m128 = ops.bq_permute_words(b, _sigma_words(32), 8, _sigma_words(32, 4), 2, True)
            q, d = q.view(i8), head.view(torch.float16).view(O, nb)
        else:
            d = _f16(b[..., 0:2])
            q, _ = _store(b[..., 2:].contiguous().view(i8).view(O, K), 8, 32)
    elif qtype in ("Q5_0", "Q5_1"):
        off = 2 if qtype == "Q5_0" else 4
        if K % 64 == 0 and ops is not None:  # one pass: values unpacked, permuted, planed; heads split off
            q, qh, head = ops.bq_pack_q5(b, off)
            b = head.view(O, nb, off)
        d = _f16(b[..., 0:2])
        if K % 64 == 0:  # nibbles + a high-bit plane
            if ops is None:
                v = _nibbles_32(b[..., off + 4:]) | (_q5_high(b[..., off:off + 4]) << 4)  # 0..31
                q, qh = _store(v.reshape(O, K), 5, 32)
            bits = 5
            if qtype == "Q5_0":
                dm, mn = d, torch.full((O, nb), 16, dtype=i8)  # d * u - d * 16 == d * (u - 16) exactly
            else:
                dm, mn = -_f16(b[..., 2:4]), torch.ones(O, nb, dtype=i8)
        else:
            v = _nibbles_32(b[..., off + 4:]) | (_q5_high(b[..., off:off + 4]) << 4)  # 0..31
            if qtype == "Q5_0":
                q, _ = _store((v.to(i8) - 16).view(O, K), 8, 32)
            else:
                q, _ = _store(v.to(i8).view(O, K), 8, 32)
                dm, mn = -_f16(b[..., 2:4]), torch.ones(O, nb, dtype=i8)
    elif qtype in ("Q4_0", "Q4_1"):
        d = _f16(b[..., 0:2])
        v = _nibbles_32(b[..., 2 if qtype == "Q4_0" else 4:]).reshape(O, K)  # 0..15
        if qtype == "Q4_1":
            dm, mn = -_f16(b[..., 2:4]), torch.ones(O, nb, dtype=i8)
        elif K % 64 == 0:
            dm, mn = d, torch.full((O, nb), 8, dtype=i8)  # d * q - d * 8 == d * (q - 8) exactly
        if K % 64 == 0:
            (q, _), bits = _store(v, 4, 32), 4
        elif qtype == "Q4_0":
            q, _ = _store(v.to(i8) - 8, 8, 32)
        else:
            q, _ = _store(v.to(i8), 8, 32)
    elif qtype in ("Q4_K", "Q5_K"):
        S = 256
        if qtype == "Q4_K" and ops is not None:  # one pass: nibble words permuted, the 16-byte heads split off
            q4, head, _ = ops.bq_permute_words(b, _q4k_words(), 1, None, 16, False)
            b = head.view(O, nb, 16)
        d, dm = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s6, m6 = _scale_min_k4(b[..., 4:16])
        sc, mn = s6.to(i8).reshape(O, nb * 8), m6.to(i8).reshape(O, nb * 8)
        if qtype == "Q4_K":  # the stored order is a word permutation of the file's nibble bytes:
            # stored word 8k + 4jj + t of a super-block <- file word 8t + 2k + jj
            if ops is not None:
                q = q4
            else:
                words = b[..., 16:].contiguous().view(torch.int32).view(O, nb, 4, 4, 2)
                q = words.permute(0, 1, 3, 4, 2).contiguous().view(torch.uint8).view(O, K // 2)
            bits = 4
        else:  # Q5_K: file nibbles (per 64: low = i, high = 32 + i) + bit c of qh[i] = bit 4 of weight 32c + i
            p = b[..., 48:].reshape(O, nb * 4, 1, 32)
            lo = torch.cat([p & 15, p >> 4], dim=2).reshape(O, nb, 8, 32)
            hi = (b[..., 16:48].reshape(O, nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
            (q, qh), bits = _store((lo | (hi << 4)).reshape(O, K), 5, 32), 5
    elif qtype == "Q6_K":
        S, G = 256, 16
        bits, zp = 6, 32
        if ops is not None:  # one pass: nibbles + plane built, the 18-byte tails (scales, d) split off
            q, qh, tail = ops.bq_pack_q6k(b)
            b = tail.view(O, nb, 18)
            scales, d = b[..., 0:16], _f16(b[..., 16:18])
        else:
            ql, qh, scales, d = b[..., 0:128], b[..., 128:192], b[..., 192:208], _f16(b[..., 208:210])
        # per 128 weights: low nibble of ql[l] = weight l, high = 64 + l; qh[i] bits 2c = weight 32c + i
        if ops is None:
            lo = (ql.reshape(O, nb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 1, 2, 1)) & 15
            hi = (qh.reshape(O, nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)) & 3
            q, qh = _store((lo.reshape(O, nb, 2, 4, 32) | (hi << 4)).reshape(O, K), 6, 16)
        sc = scales.contiguous().view(i8).view(O, nb * 16)
    else:
        raise ValueError(f"GGUF type {qtype} has no native layout; use one of {', '.join(NATIVE_TYPES)}")

    def own(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        """Contiguous, own memory (never a view of the mapped file, whose pages get dropped)."""
        if t is None:
            return None
        t = t.reshape(*shape).contiguous() if shape else t.contiguous()
        return t.clone() if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() else t

    return BlockWeight(qtype, (O, K), own(q), own(qh), own(d, O, K // S), own(sc), own(dm, O, K // S), own(mn),
                       G, S, bits, zp, m128)


# -- dequantization (PyTorch; exact) ------------------------------------------------------------
def _dequant_rows(w: BlockWeight, q, qh, d, sc, dm, mn, dtype: torch.dtype) -> torch.Tensor:
    rows, K, G, S = q.shape[0], w.shape[1], w.G, w.S
    if w.nib:
        p = q.view(rows, K // 64, 1, 32)
        q = torch.cat([p & 15, p >> 4], dim=2).view(rows, K)
        if w.bits == 5:
            q = q | (_unplane5(qh, K) << 4)
        elif w.bits == 6:  # bits 2c..2c+1 of byte i (per 128) are bits 4-5 of weight 32c + i
            sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
            q = q | (((qh.view(rows, K // 128, 1, 32) >> sh) & 3) << 4).view(rows, K)
    q = q.index_select(1, _sigma(K, G)[1])  # stored order -> weight order
    if w.zp:
        q = q.to(torch.int16) - w.zp
    vals = q.float().view(rows, K // G, G)
    scale = d.float().repeat_interleave(S // G, dim=1)
    if sc is not None:
        scale = scale * sc.float()  # (d * sc), then * q: gguf's order
    out = vals * scale[..., None]
    if dm is not None:
        off = dm.float().repeat_interleave(S // 32, dim=1) * mn.float()
        out = out.view(rows, K // 32, 32) - off[..., None]
    return out.reshape(rows, K).to(dtype)


def dequantize(w: BlockWeight, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0..r1 as a dense tensor: exactly ``gguf.quants.dequantize`` of the file's bytes."""
    r1 = w.shape[0] if r1 is None else r1
    bufs = [None if t is None else t[r0:r1] for t in (w.q, w.qh, w.d, w.sc, w.dm, w.mn)]
    return _dequant_rows(w, *bufs, dtype)


# -- modules ------------------------------------------------------------------------------------
class GGUFLinear(_QuantLinear):
    """A linear over a GGUF block-quantized weight, at its own precision."""

    fmt = "gguf"

    def __init__(self, w: BlockWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(w.shape[1], w.shape[0], bias)
        self.qtype, self.G, self.S, self.bits, self.zp = w.qtype, w.G, w.S, w.bits, w.zp
        for name, t in w.buffers().items():
            self.register_buffer(name, t)
        self.max_kernel_rows = KERNEL_MAX_ROWS["gguf", torch.float32]
        self.max_kernel_rows_bf16 = KERNEL_MAX_ROWS["gguf", torch.bfloat16]
        if not w.kernel_ok:
            self._ops = None  # exact dequantize-and-multiply path for this tensor

    @property
    def block_weight(self) -> BlockWeight:
        return BlockWeight(self.qtype, (self.out_features, self.in_features), self.q, self.qh, self.d, self.sc,
                           self.dm, self.mn, self.G, self.S, self.bits, self.zp)

    @classmethod
    def concat(cls, mods: list["_QuantLinear"]) -> "_QuantLinear":
        """Rows stack when the layouts agree (q/k/v of one GGUF format); ValueError when they don't
        (the model then keeps the projections separate)."""
        first = mods[0]
        key = lambda m: (type(m), m.in_features, m.G, m.S, m.bits, m.zp,  # noqa: E731
                         tuple(b is None for b in (m.qh, m.sc, m.dm, m.mn)))
        if any(key(m) != key(first) for m in mods):
            raise ValueError("GGUF linears of different block layouts cannot be stacked")
        fused = super().concat(mods)
        if all(m.dm is not None and m.dm.data_ptr() == m.d.data_ptr() for m in mods):
            fused.dm = fused.d  # Q4_0/Q5_0 offsets are d itself: keep one copy
        for name in ("qh", "sc", "dm", "mn"):  # absent parts stay absent (concat stacks the present ones)
            if name not in fused._buffers:
                fused.register_buffer(name, None)
        fused.qtype = "+".join(dict.fromkeys(m.qtype for m in mods))
        fused.G, fused.S, fused.bits, fused.zp = first.G, first.S, first.bits, first.zp
        fused.max_kernel_rows, fused.max_kernel_rows_bf16 = first.max_kernel_rows, first.max_kernel_rows_bf16
        if any(m._ops is None for m in mods):
            fused._ops = None
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"

    def dequantize(self, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.block_weight, r0, r1, dtype)

    def _kernel_args(self) -> tuple:
        return (self.q, self.qh, self.d, self.sc, self.dm, self.mn, self.G, self.S, self.bits, self.zp, self.bias)

    def _kernel(self, k, x: torch.Tensor) -> torch.Tensor:
        return k.bq_linear(x, *self._cached_args())

    def _kernel_dequant(self, k, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return k.bq_dequant(self.q, self.qh, self.d, self.sc, self.dm, self.mn, self.G, self.S, self.bits,
                            self.zp, r0, r1, _tile_buffer(r1 - r0, self.in_features, dtype))


class GGUFEmbedding(KernelSwitch, nn.Module):
    """Token embedding over a GGUF block-quantized table: the looked-up rows are dequantized
    (exactly) per call; the table stays at the file's precision."""

    def __init__(self, w: BlockWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = w.shape
        self.qtype, self.G, self.S, self.bits, self.zp, self.out_dtype = w.qtype, w.G, w.S, w.bits, w.zp, dtype
        for name, t in w.buffers().items():
            self.register_buffer(name, t)
        self._ops = kernels.ops()  # None: the tensor ops below (no kernels, or use_kernel = False)

    @property
    def block_weight(self) -> BlockWeight:
        return BlockWeight(self.qtype, (self.num_embeddings, self.embedding_dim), self.q, self.qh, self.d,
                           self.sc, self.dm, self.mn, self.G, self.S, self.bits, self.zp)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        k = self._ops
        if k is not None and flat.is_cpu and self.out_dtype in (torch.float32, torch.bfloat16):
            # the rows dequantized by the kernels (the same values; ~5 us a token instead of ~300
            # for the tensor ops below)
            out = torch.empty(flat.numel(), self.embedding_dim, dtype=self.out_dtype)
            k.bq_dequant_ids(self.q, self.qh, self.d, self.sc, self.dm, self.mn, self.G, self.S, self.bits, self.zp,
                             flat.long().contiguous(), out)
            return out.view(*ids.shape, self.embedding_dim)
        bufs = [None if t is None else t.index_select(0, flat) for t in (self.q, self.qh, self.d, self.sc, self.dm,
                                                                          self.mn)]
        return _dequant_rows(self.block_weight, *bufs, self.out_dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def native_on_linear(fallback=None):
    """``on_linear`` for ``load_weights`` when a GGUF runs at its own precision: a linear whose
    weight arrived packed becomes a GGUFLinear; a dense one (F16/F32/BF16 tensors) goes to
    ``fallback`` (None: stays dense)."""
    kernels.ops()  # build / load once, up front

    def on_linear(name: str, linear: nn.Module) -> nn.Module | None:
        packed = getattr(linear, "packed_weight", None)
        if packed is None:
            return fallback(name, linear) if fallback is not None else None
        bias = None if linear.bias is None else linear.bias.detach()
        return packed.linear(bias)

    return on_linear
