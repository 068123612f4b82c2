"""GGUF linears over many rows on AMX-INT8 tiles (gguf_kernels.cpp, bq_linear_tiles): the same
int8 activations, integers and scales as the GEMV, 16 x 16 x 32 products per tile instruction.

Where the build has tiles (QWENRUN_ISA "amx": Sapphire Rapids and later) they run in this
process; on every CPU the "vnni-emulated" build runs the same code with the tile product emulated
(its scale arithmetic in AVX2 with the same operations per lane), in a subprocess. Both are held
to the fp64 simulation of the arithmetic (the GEMV's bound), and on a tile CPU the emulation must
equal the real tiles bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenrun.quant import kernels

HERE = Path(__file__).resolve().parent
OPS = kernels.ops()
ROWS = (16, 33, 47)  # one tile of rows, a partial last tile, an odd unit count is in CASES' shapes


def tile_battery() -> dict[str, torch.Tensor]:
    """Every GGUF layout at odd shapes, tiles forced on (and the GEMV forced, for reference)."""
    sys.path.insert(0, str(HERE))
    from test_gguf_native import kernel_cases

    ops = kernels.ops()
    out: dict[str, torch.Tensor] = {"tiles": torch.tensor(list(ops.bq_tiles().encode()))}
    default = ops.bq_tiles_min_rows()
    g = torch.Generator().manual_seed(11)
    try:
        for qtype, O, K, w in kernel_cases(seed=5):
            bias = torch.randn(O, generator=g)
            for N in ROWS:
                x = torch.randn(N, K, generator=g)
                for dt in (torch.float32, torch.bfloat16):
                    key = f"{qtype}/{O}x{K}/N{N}/{str(dt)[6:]}"
                    out["x/" + key] = x.to(dt)
                    ops.bq_tiles(1)
                    out["tiles/" + key] = ops.bq_linear(x.to(dt), *w.kernel_args(), bias)
                    ops.bq_tiles(1 << 30)
                    out["gemv/" + key] = ops.bq_linear(x.to(dt), *w.kernel_args(), bias)
            out[f"bias/{qtype}/{O}x{K}"] = bias
    finally:
        ops.bq_tiles(default)
    return out


def _check(bat: dict[str, torch.Tensor]) -> int:
    """Tiles vs the fp64 simulation and vs the GEMV; returns the number of cases checked."""
    sys.path.insert(0, str(HERE))
    from test_gguf_native import CASES, gguf_blocks, reference
    from test_quant import rel, simulate_kernel

    n = 0
    for qtype, O, K in CASES:
        if f"bias/{qtype}/{O}x{K}" not in bat:
            continue
        ref_w = reference(qtype, gguf_blocks(qtype, O, K, seed=5), O, K)
        bias = bat[f"bias/{qtype}/{O}x{K}"].double()
        for N in ROWS:
            for dt in ("float32", "bfloat16"):
                key = f"{qtype}/{O}x{K}/N{N}/{dt}"
                x, y, y_gemv = bat["x/" + key], bat["tiles/" + key], bat["gemv/" + key]
                assert y.dtype == x.dtype and y.shape == (N, O), key
                if dt == "float32":  # bf16 outputs are rounded: compared to the GEMV's, one rounding apart
                    assert rel(y, simulate_kernel(x, ref_w, 32) + bias) < 2e-6, (key, rel(y, simulate_kernel(x, ref_w, 32) + bias))
                    assert rel(y, y_gemv) < 2e-6, key
                else:
                    assert rel(y.float(), y_gemv.float()) < 1e-2, key
                n += 1
    return n


def _emulated(dst: Path) -> dict[str, torch.Tensor]:
    env = dict(os.environ, QWENRUN_ISA="vnni-emulated", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    code = "import sys, torch, test_gguf_tiles as t; torch.save(t.tile_battery(), sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(dst)], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(dst)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return _emulated(tmp_path_factory.mktemp("tiles") / "emulated.pt")


@pytest.mark.skipif(OPS is None, reason="kernels unavailable (CPU without AVX2, or QWENRUN_NO_KERNELS)")
def test_emulated_tiles_match_the_simulation_and_the_gemv(emulated):
    assert bytes(emulated.pop("tiles").tolist()).decode() == "amx (emulated)"
    assert _check(emulated) > 60


@pytest.mark.skipif(OPS is None or OPS.bq_tiles() != "amx", reason="this CPU has no AMX-INT8 tiles (the emulated "
                    "test above runs the same code on every CPU)")
def test_real_tiles_match_the_simulation_and_equal_the_emulation_bit_for_bit(emulated):
    mine = tile_battery()
    assert bytes(mine.pop("tiles").tolist()).decode() == "amx"
    assert _check(mine) > 60
    for k, v in mine.items():
        if k.startswith("tiles/"):
            assert torch.equal(v, emulated[k]), (k, (v.float() - emulated[k].float()).abs().max())


def dispatch_check() -> bool:
    """bq_linear takes the tiles from bq_tiles_min_rows() rows on and the GEMV below (a build with
    a tile path); a build without one says so and has no threshold. Returns whether tiles exist."""
    from test_gguf_native import gguf_blocks

    from qwenrun.quant.gguf_linear import pack

    ops = kernels.ops()
    at = ops.bq_tiles_min_rows()
    if not ops.bq_tiles():
        assert at == -1 and kernels.isa() not in ("amx", "vnni-emulated")
        return False
    assert at >= 16
    w = pack("Q4_K", gguf_blocks("Q4_K", 40, 512, seed=1), (40, 512))
    x = torch.randn(at + 5, 512, generator=torch.Generator().manual_seed(3))
    auto = ops.bq_linear(x, *w.kernel_args(), None), ops.bq_linear(x[:at - 1], *w.kernel_args(), None)
    try:
        ops.bq_tiles(1)
        tiles = ops.bq_linear(x, *w.kernel_args(), None)
        ops.bq_tiles(1 << 30)
        gemv = ops.bq_linear(x[:at - 1], *w.kernel_args(), None)
    finally:
        ops.bq_tiles(at)
    assert torch.equal(auto[0], tiles) and torch.equal(auto[1], gemv)
    assert not torch.equal(auto[0][:at - 1], gemv)  # the two paths' fp32 sums do differ: a real switch
    assert ops.bq_tiles_min_rows() == at
    return True


@pytest.mark.skipif(OPS is None, reason="kernels unavailable (CPU without AVX2, or QWENRUN_NO_KERNELS)")
def test_bq_linear_takes_the_tiles_from_the_threshold_on():
    assert dispatch_check() == (kernels.isa() in ("amx", "vnni-emulated"))
    env = dict(os.environ, QWENRUN_ISA="vnni-emulated", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    r = subprocess.run([sys.executable, "-c", "import test_gguf_tiles as t; assert t.dispatch_check()"], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]  # the emulated build's dispatch, on every CPU
