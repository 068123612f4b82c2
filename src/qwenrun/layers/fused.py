"""Fused CPU ops for the decode step (``csrc/fused_ops.cpp``): what a layer does between its
linears — RMSNorm with the residual add, RoPE + KV-cache write + decode attention, SiLU·mul — in
four calls per layer instead of ~25 PyTorch dispatches. When every linear runs on a kernel (GGUF
blocks, int8, int4), an all-decode step goes further: ``DecodePlan`` runs the whole layer loop,
linears included, in one C++ call (qwen2._decode_plan; off with QWENRUN_NO_DECODE_PLAN=1 or
``no_plan()``).

``ops()`` returns the ops (the extension's ``fused`` submodule) or ``None``; with ``None`` the
model runs its plain PyTorch path, which is also what the equivalence tests compare against.
The fused ops are off when the kernels are (``QWENRUN_NO_KERNELS=1``, no AVX2, no compiler), with
``QWENRUN_NO_FUSED=1``, inside ``disabled()``, and for tensors that are not on the CPU (checked
by the caller per forward: ``usable(x)``)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

_UNSET = object()
_ops: object = _UNSET
_forced_off = 0


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def disabled_by_env() -> bool:
    return _env_on("QWENRUN_NO_FUSED")


def ops():
    """The fused ops' namespace when the kernel extension is loaded and has them, else None."""
    global _ops
    if _forced_off or disabled_by_env():
        return None
    if _ops is _UNSET:
        from ..quant import kernels

        _ops = None
        ext = kernels.ops()
        _ops = getattr(ext, "fused", None)  # pybind submodule (no boxed-dispatcher cost per call)
    return _ops  # type: ignore[return-value]


def usable(x: torch.Tensor):
    """The fused ops for activations like ``x`` (CPU, fp32 or bf16), else None."""
    o = ops()
    if o is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return o


_plan_off = 0


def plan_disabled() -> bool:
    """The one-call decode step (DecodePlan) is off: QWENRUN_NO_DECODE_PLAN=1 or ``no_plan()``;
    the model then runs its per-layer fused loop (the plan's reference in tests)."""
    return _plan_off > 0 or _env_on("QWENRUN_NO_DECODE_PLAN")


@contextmanager
def no_plan():
    global _plan_off
    _plan_off += 1
    try:
        yield
    finally:
        _plan_off -= 1


@contextmanager
def disabled():
    """Run the plain PyTorch path inside this block (tests, benchmarks' A/B)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1
