#!/usr/bin/env python
"""Where the many-row path (weights dequantized to tiles + GEMM) overtakes the integer GEMV kernel,
per format and shape, with bf16 activations (the quantized default on CPUs with native bf16).
Prints, per row count N, "kernel ms / tiles ms"; KERNEL_MAX_ROWS in qwenrun/quant/linear.py is
set from these crossovers.

    .venv/bin/python benchmarks/bench_crossover.py
"""
from __future__ import annotations

import time

import torch

from qwenrun.quant.linear import Int4Linear, Int8Linear

SHAPES = ((896, 896), (896, 1152), (896, 4864), (4864, 896), (2560, 2560), (2560, 6912), (2560, 7680), (6912, 2560))
ROWS = (8, 12, 16, 20, 24, 32, 48)


def main() -> None:
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; activations bfloat16; ms per call, kernel / tiles")
    for cls in (Int8Linear, Int4Linear):
        for K, O in SHAPES:
            q = cls(torch.randn(O, K))
            res = []
            for n in ROWS:
                x = torch.randn(n, K).bfloat16()
                ts = []
                for rows in (10 ** 6, 0):  # force the kernel, then force the tiles
                    q.max_kernel_rows_bf16 = rows
                    q(x)
                    t = time.perf_counter()
                    for _ in range(20):
                        q(x)
                    ts.append((time.perf_counter() - t) / 20 * 1e3)
                res.append(f"N={n} {ts[0]:.2f}/{ts[1]:.2f}")
            print(cls.__name__, K, O, " ".join(res), flush=True)


if __name__ == "__main__":
    main()
