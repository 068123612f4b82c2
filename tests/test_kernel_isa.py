"""The kernels' code paths (quant/kernels.py ISAS): the build picks the widest integer dot product
the CPU has (AVX-VNNI, AVX-512 VNNI, else AVX2), QWENRUN_ISA caps it, and every path computes
the same integers, so their outputs are bit-identical.

The machine's own path runs in this process (and is checked against fp64 simulations in
test_gguf_native / test_quant); each other path this CPU can run is built and run in a
subprocess on the same inputs: "avx2" on a VNNI CPU, and everywhere "vnni-emulated", the VNNI
branches of the kernels with vpdpbusd emulated exactly in AVX2, so a CPU without VNNI still
runs the code a VNNI CPU takes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenrun.quant import kernels

OPS = kernels.ops()
HERE = Path(__file__).resolve().parent


def battery() -> dict[str, torch.Tensor]:
    """Every kernel that multiplies integers, on fixed inputs: GGUF formats at odd shapes with
    1-17 activation rows (the NR = 1..4 paths, the many-row blocking, half groups, plain rests;
    GEMV only: tile builds take the tiles from 16 rows, and those are bounded against the GEMV in
    test_gguf_tiles.py), and the int8 / int4 linears."""
    sys.path.insert(0, str(HERE))
    from test_gguf_native import kernel_cases

    from qwenrun.quant.linear import Int4Linear, Int8Linear

    ops = kernels.ops()
    out: dict[str, torch.Tensor] = {"isa": torch.tensor(list(ops.isa().encode()))}
    g = torch.Generator().manual_seed(5)
    tiles_from = ops.bq_tiles_min_rows()
    ops.bq_tiles(1 << 30)  # the GEMV at every row count here (the AMX tile path: test_gguf_tiles.py)
    try:
        for qtype, O, K, w in kernel_cases(seed=7):
            bias = torch.randn(O, generator=g)
            for N in (1, 2, 3, 4, 5, 17):
                x = torch.randn(N, K, generator=g)
                out[f"{qtype}/{O}x{K}/N{N}"] = ops.bq_linear(x, *w.kernel_args(), bias)
    finally:
        if tiles_from > 0:
            ops.bq_tiles(tiles_from)
    for cls in (Int8Linear, Int4Linear):
        for O, K in ((37, 256), (19, 2560)):
            lin = cls(torch.randn(O, K, generator=g) * 0.05, torch.randn(O, generator=g))
            for N in (1, 3, 8):
                out[f"{cls.fmt}/{O}x{K}/N{N}"] = lin._kernel(ops, torch.randn(N, K, generator=g))
    return out


def _run_path(isa: str, dst: Path) -> None:
    env = dict(os.environ, QWENRUN_ISA=isa, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    code = ("import sys, torch, test_kernel_isa as t; torch.save(t.battery(), sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(dst)], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]


OTHER_PATHS = [p for p in ("avx2", "vnni-emulated") if kernels.cpu_supported() and p != kernels.isa() and
               not (kernels.ISAS[p][0] - kernels.cpu_flags())]


@pytest.mark.skipif(OPS is None, reason="kernels unavailable (CPU without AVX2, or QWENRUN_NO_KERNELS)")
@pytest.mark.parametrize("other", OTHER_PATHS)
def test_every_code_path_gives_bit_identical_outputs(other, tmp_path):
    mine = battery()
    _run_path(other, tmp_path / "other.pt")
    theirs = torch.load(tmp_path / "other.pt")
    assert bytes(theirs.pop("isa").tolist()).decode() == ("avx2 (vnni emulated)" if other == "vnni-emulated" else other)
    assert bytes(mine.pop("isa").tolist()).decode() == OPS.isa()
    assert mine.keys() == theirs.keys() and len(mine) > 60
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), (k, (mine[k] - theirs[k]).abs().max())


FLAGS_AVX2 = {"avx2", "fma", "f16c"}
AVX512_VNNI = FLAGS_AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile"}


@pytest.mark.parametrize("flags,env,want", [
    (FLAGS_AVX2, "", "avx2"),                                   # Zen 1-3, Haswell-Skylake client
    (AVX512_VNNI, "", "avx512-vnni"),                           # Cascade Lake, Ice Lake, Zen 4
    (AVX512_VNNI | {"avx_vnni"}, "", "avx-vnni"),               # Zen 5 (no AMX)
    (AVX512_VNNI | {"avx_vnni", "amx_int8"}, "", "amx"),        # Sapphire Rapids and later
    (AVX512_VNNI | {"avx_vnni", "amx_int8"}, "avx-vnni", "avx-vnni"),
    (AVX512_VNNI | {"amx_int8"}, "amx", "amx"),
    (FLAGS_AVX2 | {"avx_vnni"}, "auto", "avx-vnni"),            # Alder Lake (no AVX-512)
    (AVX512_VNNI | {"avx_vnni"}, "avx2", "avx2"),               # capped by the user
    (AVX512_VNNI | {"avx_vnni"}, "AVX512-VNNI", "avx512-vnni"),
    (FLAGS_AVX2, "vnni-emulated", "vnni-emulated"),
])
def test_isa_follows_the_cpu_flags_and_the_cap(monkeypatch, flags, env, want):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(flags))
    monkeypatch.setenv("QWENRUN_ISA", env)
    assert kernels.isa() == want
    assert all(f in kernels.cflags() for f in kernels.ISAS[want][1])


def test_isa_build_key_and_bad_requests(monkeypatch):
    names = set()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(AVX512_VNNI) | {"amx_int8"})
    for isa in ("avx2", "avx512-vnni", "vnni-emulated", "amx"):
        monkeypatch.setenv("QWENRUN_ISA", isa)
        names.add(kernels.build_name())
    assert len(names) == 4  # one cached build per path: a shared cache never mixes them
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(FLAGS_AVX2))
    monkeypatch.setenv("QWENRUN_ISA", "avx512-vnni")
    with pytest.raises(ValueError, match="lacks avx512_vnni, avx512bw, avx512f, avx512vl"):
        kernels.isa()  # a build that would die of SIGILL is refused up front
    monkeypatch.setenv("QWENRUN_ISA", "sse9")
    with pytest.raises(ValueError, match="expected auto or one of"):
        kernels.isa()
