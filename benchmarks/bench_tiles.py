"""GGUF linears, GEMV kernel vs AMX tiles (gguf_kernels.cpp) at given shapes and row counts: the
crossover behind g_amx_min_rows and the many-row speed. Median of 7 calls, 2 threads.

    .venv/bin/python benchmarks/bench_tiles.py                       # 4B and demo shapes
    .venv/bin/python benchmarks/bench_tiles.py Q4_K,6912,2560 --rows 8,16,256
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPES = ["Q4_K,6912,2560", "Q8_0,6912,2560", "Q6_K,2560,6912", "Q4_K,2560,2560", "Q5_0,9728,896",
          "Q8_0,896,4864", "Q6_K,896,4864"]


def median_ms(f, reps: int = 7) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2] * 1e3


def main() -> int:
    from test_gguf_native import gguf_blocks

    from qwenrun.quant import kernels
    from qwenrun.quant.gguf_linear import pack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", nargs="*", default=SHAPES, help="FORMAT,O,K")
    ap.add_argument("--rows", default="4,8,12,16,24,32,64,256")
    args = ap.parse_args()
    ops = kernels.ops()
    if ops is None or not ops.bq_tiles():
        print(f"no tile path in this build ({kernels.describe()})")
        return 1
    torch.set_num_threads(2)
    default = ops.bq_tiles_min_rows()
    print(f"{kernels.describe()}; tiles: {ops.bq_tiles()}, taken from {default} rows")
    try:
        for spec in args.shapes:
            qtype, O, K = spec.split(",")
            O, K = int(O), int(K)
            w = pack(qtype, gguf_blocks(qtype, O, K, seed=1), (O, K))
            kargs = w.kernel_args()
            cells = []
            for N in (int(n) for n in args.rows.split(",")):
                x = torch.randn(N, K)
                ops.bq_tiles(1 << 30)
                a = median_ms(lambda: ops.bq_linear(x, *kargs, None))
                ops.bq_tiles(1)
                b = median_ms(lambda: ops.bq_linear(x, *kargs, None))
                cells.append(f"N={N} {a:.2f}/{b:.2f} ({2 * N * O * K / b / 1e6:.0f} GOP/s)")
            print(f"{qtype} {O}x{K}, ms GEMV/tiles: " + "  ".join(cells), flush=True)
    finally:
        ops.bq_tiles(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
