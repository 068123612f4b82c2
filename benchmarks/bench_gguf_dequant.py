#!/usr/bin/env python
"""Time the exact GGUF tile dequantizer (the many-row path) of two kernel builds in one process.

    .venv/bin/python benchmarks/bench_gguf_dequant.py NEW_BUILD OLD_BUILD

BUILD: a directory name under ~/.cache/qwenrun/kernels (``python -c "from qwenrun.quant.kernels
import build_name; print(build_name())"`` names the current one). Both builds must take the bq_dequant signature with qh, bits and zp
(the bit-plane layouts)."""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_gguf_native import gguf_blocks  # noqa: E402

from qwenrun.quant.gguf_linear import pack  # noqa: E402
from qwenrun.quant.kernels import cache_dir  # noqa: E402


def load(name: str):
    so = glob.glob(str(cache_dir() / name / f"{name}.so"))[0]
    loader = importlib.machinery.ExtensionFileLoader(name, so)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, so, loader=loader))
    loader.exec_module(mod)
    return mod


def main() -> int:
    builds = {"new": load(sys.argv[1]), "old": load(sys.argv[2])}
    O, K = 6912, 2560
    for qt in ("Q6_K", "Q4_K", "Q8_0"):
        w = pack(qt, gguf_blocks(qt, O, K), (O, K))
        out = torch.empty(O, K)
        for label, m in builds.items():
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                m.bq_dequant(*w.kernel_args(), 0, O, out)
                ts.append(time.perf_counter() - t)
            print(f"{qt} {label}: {min(ts) * 1e3:.1f} ms for a {O}x{K} tile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
