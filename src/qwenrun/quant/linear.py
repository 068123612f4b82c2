"""Weight-only int8 / int4 linears that replace ``nn.Linear`` as the checkpoint loads.

Formats (what the AVX2 kernels in ``csrc/quant_kernels.cpp`` read, row-major, one row per
output feature, K = in_features zero-padded to Kp):

* int8: ``qweight`` int8 [O, Kp] (Kp = K rounded up to 64), ``scale`` fp32 [O];
  w = qweight * scale (symmetric, per output channel: amax / 127).
* int4: super-blocks of 128 along K, each 4 groups of 32. ``qweight`` uint8 [O, Kp/2] (two
  nibbles a byte, permuted inside a super-block so one 32-byte load feeds all four groups, see
  the C++ header), ``sub`` int8 [O, Kp/32] group sub-scales, ``d`` bf16 [O, Kp/128] super-block
  scales; w = d * sub * (nibble - 8). Each group maps its largest-magnitude weight to -8 exactly
  (llama.cpp Q4_0's rule: the full 16 levels, no zero point); the 6.9-bit sub-scale relative to
  d costs < 0.4% of scale precision, far below int4's own error. 4.375 bits/weight.

Forward: few rows (decode) → the kernel quantizes x per 64/128-block to int8 and runs an
integer GEMV over both cores; many rows (prefill) → weight tiles are dequantized to fp32 and
multiplied with MKL sgemm, which is compute-bound there and faster than the integer kernel.
Without the kernels (no AVX2, no compiler, CUDA tensors, ``QWENRUN_NO_KERNELS=1``) the same
tiles are dequantized by PyTorch ops: slower, same formats, no activation quantization."""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..loader import cpu_has_fast_bf16
from . import kernels

INT8_BLOCK = 64  # K padding of int8 weights (= the kernel's activation block)
INT4_SB = 128  # int4 super-block (4 groups of 32)
INT4_GROUP = 32
# Up to this many rows the integer kernel beats dequantize-a-tile + GEMM. Measured, 2 threads.
# fp32 activations (tile + MKL sgemm), K=2560 O=6912 (ms, kernel vs tiles): int8 N=24 6.6 vs 7.4,
# N=32 8.8 vs 7.7; int4 N=48 8.4 vs 9.5, N=64 11.2 vs 10.8 (K=896 O=4864 crosses later). Beyond,
# the tiled path costs 6-14% over dense fp32 (N=512: int8 58.0, int4 57.6, fp32 54.2 ms).
# bf16 activations on a CPU with native bf16 (bf16 tile + oneDNN AMX GEMM, Sapphire Rapids):
# the tiles cost ~4.2 ms at K=2560 O=6912 whatever N up to 32 (tile writing and the GEMM's weight
# packing bind, not FLOPs); int8 N=12 3.8 vs 4.2, N=16 6.2 vs 4.2 (K=6912 O=2560: 4.1/4.4,
# 5.3/4.8); int4 N=16 3.8 vs 4.5, N=24 5.2 vs 4.9. Rerun: benchmarks/bench_crossover.py.
KERNEL_MAX_ROWS = {("int8", torch.float32): 24, ("int4", torch.float32): 48,
                   ("int8", torch.bfloat16): 14, ("int4", torch.bfloat16): 22}
# GGUF block formats (gguf_linear.py): the interleaved-group kernel unpacks a weight row once for
# up to 4 activation rows. A 6912x2560 weight on Zen 3, one thread (CPU ms, kernel vs exact tiles +
# fp32 GEMM): Q8_0 N=16 9.8 vs 32, N=64 41 vs 48; Q4_K N=64 36 vs 51; Q6_K N=32 21 vs 42, N=64 59
# vs 56: the integer kernel stays ahead to ~64 rows, and a whole 128-token prefill of the 4B
# Q4_K_M file runs at 16.7-18.1 tok/s through it vs 11.3-12.3 through the tiles (same process).
# So fp32 activations always take the kernel; bf16 ones, where bf16 GEMMs are native (AMX,
# AVX512-BF16), switch to bf16 tiles + GEMM above 64 rows.
KERNEL_MAX_ROWS.update({("gguf", torch.float32): 1 << 30, ("gguf", torch.bfloat16): 64})
TILE_ELEMS = 1 << 22  # weights dequantized per tile on the many-row path (16 MiB of fp32)
_CHUNK = 1 << 24  # weights quantized at a time at load (bounds temporaries to ~4 dense copies of 64 MiB)


def _pad_k(w: torch.Tensor, mult: int) -> torch.Tensor:
    k = w.shape[1]
    kp = -(-k // mult) * mult
    return w if kp == k else F.pad(w, (0, kp - k))


def _row_chunks(w: torch.Tensor):
    step = max(1, _CHUNK // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        yield r0, w[r0:r0 + step]


# -- int8 ----------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, K] float → (qweight int8 [O, Kp], scale fp32 [O]); symmetric per output channel.
    The C++ packer (same arithmetic, bit-identical) is ~50x faster than these PyTorch ops."""
    k = kernels.ops() if (use_kernel and w.device.type == "cpu") else None
    if k is not None:
        return tuple(k.quantize_int8(w))
    O, K = w.shape
    kp = -(-K // INT8_BLOCK) * INT8_BLOCK
    q = torch.empty(O, kp, dtype=torch.int8, device=w.device)
    scale = torch.empty(O, dtype=torch.float32, device=w.device)
    for r0, c in _row_chunks(w):
        c = _pad_k(c.float(), INT8_BLOCK)
        s = c.abs().amax(1, keepdim=True) / 127.0  # [rows, 1]
        q[r0:r0 + len(c)] = torch.where(s > 0, c / s, 0.0).round_().clamp_(-127, 127).to(torch.int8)
        scale[r0:r0 + len(c)] = s[:, 0]
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, K: int, r0: int = 0, r1: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0..r1 of the int8 weight as a dense [r1 - r0, K] tensor (pure PyTorch)."""
    r1 = qweight.shape[0] if r1 is None else r1
    return (qweight[r0:r1, :K].to(dtype) * scale[r0:r1, None].to(dtype))


# -- int4 ----------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[O, K] float → (qweight uint8 [O, Kp/2], sub int8 [O, Kp/32], d bf16 [O, Kp/128])."""
    k = kernels.ops() if (use_kernel and w.device.type == "cpu") else None
    if k is not None:
        return tuple(k.quantize_int4(w))
    O, K = w.shape
    kp = -(-K // INT4_SB) * INT4_SB
    nsb = kp // INT4_SB
    q = torch.empty(O, kp // 2, dtype=torch.uint8, device=w.device)
    sub = torch.empty(O, nsb * 4, dtype=torch.int8, device=w.device)
    d = torch.empty(O, nsb, dtype=torch.bfloat16, device=w.device)
    for r0, c in _row_chunks(w):
        rows = c.shape[0]
        g = _pad_k(c.float(), INT4_SB).view(rows, nsb, 4, INT4_GROUP)  # [rows, sb, group, 32]
        idx = g.abs().argmax(-1, keepdim=True)
        s = g.gather(-1, idx) / -8.0  # [rows, sb, 4, 1]: the largest-magnitude weight → -8
        dd = (s.abs().amax(2, keepdim=True) / 127.0).to(torch.bfloat16)  # [rows, sb, 1, 1]
        ddf = dd.float()
        sc = torch.where(ddf > 0, s / ddf, 0.0).round_().clamp_(-127, 127)
        eff = sc * ddf  # the scale the kernel will apply
        nib = (torch.where(eff != 0, g / eff, 0.0).round_().clamp_(-8, 7) + 8).to(torch.uint8)
        # [rows, sb, g, i, r8] → [rows, sb, i, g, r8]: vector i holds bytes g*8 + r8
        nib = nib.view(rows, nsb, 4, 4, 8).transpose(2, 3).reshape(rows, nsb, 4, 32)
        packed = nib[:, :, 0::2] | (nib[:, :, 1::2] << 4)  # [rows, sb, 2, 32]: lo = vector 2j, hi = 2j+1
        q[r0:r0 + rows] = packed.reshape(rows, kp // 2)
        sub[r0:r0 + rows] = sc.to(torch.int8).reshape(rows, nsb * 4)
        d[r0:r0 + rows] = dd.reshape(rows, nsb)
    return q, sub, d


def dequantize_int4(qweight: torch.Tensor, sub: torch.Tensor, d: torch.Tensor, K: int, r0: int = 0,
                    r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0..r1 of the int4 weight as a dense [r1 - r0, K] tensor (pure PyTorch)."""
    r1 = qweight.shape[0] if r1 is None else r1
    p = qweight[r0:r1]
    rows, nsb = p.shape[0], p.shape[1] // 64
    p = p.view(rows, nsb, 2, 1, 32)
    nib = torch.cat([p & 15, p >> 4], dim=3).view(rows, nsb, 4, 4, 8)  # [rows, sb, i, g, r8]
    vals = nib.transpose(2, 3).to(dtype) - 8  # [rows, sb, g, i, r8] = natural order
    scale = d[r0:r1].to(dtype).view(rows, nsb, 1) * sub[r0:r1].to(dtype).view(rows, nsb, 4)
    return (vals.reshape(rows, nsb, 4, 32) * scale[..., None]).reshape(rows, nsb * INT4_SB)[:, :K]


# -- modules -------------------------------------------------------------------------------------
_tls = threading.local()


def _tile_buffer(rows: int, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-thread scratch tile of ``dtype``, reused across calls and layers (one weight tile is
    consumed by its matmul before the next is written)."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < rows * K:
        buf = bufs[dtype] = torch.empty(max(rows * K, TILE_ELEMS), dtype=dtype)
    return buf[:rows * K].view(rows, K)


def _cat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(ts)`` along rows; without a copy when the tensors are consecutive row blocks of
    one contiguous buffer (as the GGUF loader packs a layer's q/k/v and gate/up): then the
    result is the view spanning them."""
    first = ts[0]
    if all(t.is_contiguous() and t.dim() == first.dim() >= 1 and t.dtype == first.dtype and t.device == first.device
           and t.shape[1:] == first.shape[1:] for t in ts):
        st = first.untyped_storage()
        pos = first.storage_offset()
        ok = True
        for t in ts:
            if t.untyped_storage().data_ptr() != st.data_ptr() or t.storage_offset() != pos:
                ok = False
                break
            pos += t.numel()
        if ok and pos * first.element_size() <= st.nbytes():
            rows = sum(t.shape[0] for t in ts)
            return first.new_empty(0).set_(st, first.storage_offset(), (rows, *first.shape[1:]), first.stride())
    return torch.cat(ts)


class KernelSwitch:
    """``use_kernel`` for a module whose kernels are the extension held in ``_ops`` (None: its
    PyTorch path). Copies and pickles keep the setting (the extension module itself can't be)."""

    _ops: object

    @property
    def use_kernel(self) -> bool:
        return self._ops is not None

    @use_kernel.setter
    def use_kernel(self, on: bool) -> None:
        """False forces the PyTorch path (tests, debugging); True uses the kernels if available."""
        self._ops = kernels.ops() if on else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ops"] = state["_ops"] is not None
        state.pop("_kargs", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._ops = kernels.ops() if state["_ops"] else None


class _QuantLinear(KernelSwitch, nn.Module):
    """Shared forward: kernel for few rows, dequantized tiles + matmul otherwise."""

    in_features: int
    out_features: int
    fmt: str
    max_kernel_rows: int  # fp32 activations; bf16 ones use max_kernel_rows_bf16

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.max_kernel_rows = KERNEL_MAX_ROWS[cls.fmt, torch.float32]
        # the bf16 crossover holds where bf16 GEMMs are native; elsewhere the bf16 GEMM is slow
        # and the integer kernel stays ahead as long as with fp32 activations
        cls.max_kernel_rows_bf16 = KERNEL_MAX_ROWS[cls.fmt, torch.bfloat16 if cpu_has_fast_bf16() else torch.float32]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._ops = kernels.ops()  # resolved once: the per-call path must stay cheap (~170 calls/token)

    # The kernel's arguments after x, cached: each buffer read through nn.Module.__getattr__ costs
    # ~1 us, 4-7 of them a call, ~100-170 calls a token. Any attribute or buffer assignment and
    # any move (.to, .float, ...) drops the cache; in-place copies (load_state_dict) keep the same
    # tensors and need no drop.
    _kargs: tuple | None = None

    def _kernel_args(self) -> tuple:  # per format: the buffers and geometry, bias last
        raise NotImplementedError

    def _cached_args(self) -> tuple:
        a = self._kargs
        if a is None:
            a = self.__dict__["_kargs"] = self._kernel_args()
        return a

    def __setattr__(self, name: str, value) -> None:
        self.__dict__["_kargs"] = None
        super().__setattr__(name, value)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        self.__dict__["_kargs"] = None
        super().register_buffer(name, tensor, persistent)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_kargs"] = None
        return super()._apply(fn, recurse)

    def _kernel(self, k, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def concat(cls, mods: list["_QuantLinear"]) -> "_QuantLinear":
        """One linear computing ``cat([m(x) for m in mods], -1)``: every buffer of these formats is
        laid out per output row, so the rows are stacked as they are (no requantization)."""
        first = mods[0]
        if any(type(m) is not cls or m.in_features != first.in_features for m in mods):
            raise ValueError("concat needs linears of one kind with the same in_features")
        fused = cls.__new__(cls)
        _QuantLinear.__init__(fused, first.in_features, sum(m.out_features for m in mods), None)
        for name, buf in first.named_buffers():
            if name == "bias":
                continue
            fused.register_buffer(name, _cat_rows([getattr(m, name) for m in mods]))
        if any(m.bias is not None for m in mods):
            dev = next(b for n, b in first.named_buffers() if n != "bias").device
            fused.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=dev)
                                    for m in mods])
        return fused

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._ops
        if k is not None and x.is_cpu:
            bf16 = x.dtype == torch.bfloat16
            limit = self.max_kernel_rows_bf16 if bf16 else self.max_kernel_rows
            if x.dim() == 2 and x.shape[0] <= limit and (bf16 or x.dtype == torch.float32) and x.is_contiguous():
                return self._kernel(k, x)  # the decode fast path: fp32 or bf16 in and out, no conversions
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] <= limit:
                y = self._kernel(k, (x2 if bf16 else x2.float()).contiguous())
            elif bf16:
                # bf16 activations: bf16 tiles and a bf16 GEMM (AMX/AVX512-BF16 where the CPU has
                # them: 1.6 TFLOP/s vs 0.3 for fp32 sgemm on the dev machine). int8 and the int4
                # levels are exact in bf16; only the per-row scale product rounds.
                y = self._tiled(x2.contiguous(), lambda r0, r1: self._kernel_dequant(k, r0, r1, torch.bfloat16))
            else:
                y = self._tiled(x2.float().contiguous(), lambda r0, r1: self._kernel_dequant(k, r0, r1))
            return y.to(x.dtype).view(*lead, self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._tiled(x2, lambda r0, r1: self.dequantize(r0, r1, x2.dtype))
        return y.view(*lead, self.out_features)

    def _tiled(self, x: torch.Tensor, tile: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """y = x @ W.T + b, W dequantized TILE_ELEMS weights at a time (bounded extra memory)."""
        O = self.out_features
        step = max(64, TILE_ELEMS // max(1, self.in_features))
        if step >= O:
            return F.linear(x, tile(0, O), None if self.bias is None else self.bias.to(x.dtype))
        y = torch.empty(x.shape[0], O, dtype=x.dtype, device=x.device)
        for r0 in range(0, O, step):
            r1 = min(O, r0 + step)
            b = None if self.bias is None else self.bias[r0:r1].to(x.dtype)
            y[:, r0:r1] = F.linear(x, tile(r0, r1), b)
        return y


class Int8Linear(_QuantLinear):
    """Weight-only int8 linear (symmetric, per output channel)."""

    fmt = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, s = quantize_int8(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    def dequantize(self, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, self.in_features, r0, r1, dtype)

    def _kernel_args(self) -> tuple:
        return (self.qweight, self.scale, self.bias)

    def _kernel(self, k, x: torch.Tensor) -> torch.Tensor:
        return k.int8_linear(x, *self._cached_args())

    def _kernel_dequant(self, k, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return k.int8_dequant(self.qweight, self.scale, r0, r1, self.in_features,
                              _tile_buffer(r1 - r0, self.in_features, dtype))


class Int4Linear(_QuantLinear):
    """Weight-only int4 linear (groups of 32, int8 sub-scales under a bf16 scale per 128)."""

    fmt = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, sub, d = quantize_int4(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("sub", sub)
        self.register_buffer("d", d)

    def dequantize(self, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.sub, self.d, self.in_features, r0, r1, dtype)

    def _kernel_args(self) -> tuple:
        return (self.qweight, self.sub, self.d, self.bias)

    def _kernel(self, k, x: torch.Tensor) -> torch.Tensor:
        return k.int4_linear(x, *self._cached_args())

    def _kernel_dequant(self, k, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return k.int4_dequant(self.qweight, self.sub, self.d, r0, r1, self.in_features,
                              _tile_buffer(r1 - r0, self.in_features, dtype))


QUANT_LINEARS: dict[str, type[_QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def make_quantizer(kind: str) -> Callable[[str, nn.Linear], nn.Module | None]:
    """``on_linear(name, linear)`` for ``Qwen2ForCausalLM.load_weights``: quantizes each linear
    as soon as its weight (and bias) arrive and returns the replacement, so the dense weight can
    be freed at once (peak memory ≈ quantized model + one dense tensor)."""
    if kind not in QUANT_LINEARS:
        raise ValueError(f"unknown quantization {kind!r}; use one of {sorted(QUANT_LINEARS)}")
    cls = QUANT_LINEARS[kind]
    kernels.ops()  # build / load once, up front, not inside the first forward

    def on_linear(name: str, linear: nn.Linear) -> nn.Module | None:
        with torch.no_grad():
            q = cls(linear.weight, linear.bias)
        # Drop the dense tensors now, even if something still holds the old module (a lazy
        # named_parameters() walk does); a tied head only loses its alias of the embedding.
        linear.weight = None
        if linear.bias is not None:
            linear.bias = None
        return q

    return on_linear
