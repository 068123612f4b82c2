#!/usr/bin/env python
"""A/B two cached builds of the quantized kernels in one process (alternating, so both see the
same machine state): the int8 GEMV at Qwen1.5-4B's gate/up shape, weights rotated over 24 copies
(425 MB, beyond the caches), one bf16 activation row. OLD is called the way the model called it
before kernels took bf16 (convert to fp32, call, round back); NEW gets bf16 directly.

    .venv/bin/python benchmarks/ab_kernel_builds.py OLD_HASH NEW_HASH
    # hashes: the suffixes of ~/.cache/qwenrun/kernels/qwenrun_quant_<hash>
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import time

import torch

from qwenrun.quant.kernels import cache_dir
from qwenrun.quant.linear import quantize_int8


def load(h: str):
    name = f"qwenrun_quant_{h}"
    so = cache_dir() / name / f"{name}.so"
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, so, loader=loader))
    loader.exec_module(mod)
    return mod


def main() -> None:
    old, new = load(sys.argv[1]), load(sys.argv[2])
    ws = [quantize_int8(torch.randn(6912, 2560)) for _ in range(24)]
    x = torch.randn(1, 2560).bfloat16()
    for _ in range(4):
        for label in ("old", "new"):
            t = time.perf_counter()
            for it in range(96):
                q, s = ws[it % 24]
                if label == "old":
                    old.int8_linear(x.float(), q, s, None).to(torch.bfloat16)
                else:
                    new.int8_linear(x, q, s, None)
            dt = (time.perf_counter() - t) / 96
            print(f"{label}: {dt * 1e6:.0f} us per call, {ws[0][0].numel() / dt / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
