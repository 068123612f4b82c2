"""Build, cache and load the CPU kernels (AVX2, with VNNI dot products where the CPU has them and
AMX-INT8 tiles for GGUF linears over many rows): quantized linears (``qwenrun/csrc/quant_*.cpp``)
and decode attention over an int8 KV cache (``kv_attention.cpp``).

The extension is compiled once per (source hash, torch version, compiler flags incl. the ISA) into a stable
cache directory — ``$QWENRUN_CACHE/kernels`` or ``~/.cache/qwenrun/kernels`` — and later
processes only load the shared object (~10 ms; a cold build takes ~50 s and ~1.6 GB).
``python -m qwenrun.quant.kernels --build`` builds it ahead of time (``make setup`` does).

``ops()`` returns the loaded module or ``None`` when the kernels can't be used: CPU without
AVX2/FMA, ``QWENRUN_NO_KERNELS=1``, no compiler, or a failed build; callers then use the
pure-PyTorch path in ``linear.py``. A failure is logged once and not retried in the process."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("qwenrun")

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [_CSRC / "quant_kernels.cpp", _CSRC / "quant_pack.cpp", _CSRC / "gguf_kernels.cpp", _CSRC / "kv_attention.cpp",
           _CSRC / "fused_ops.cpp"]
HEADERS = [_CSRC / "quant_common.h"]  # not compiled on their own, but part of the build's identity
# -ffp-contract=off: a * b - c stays two roundings (no fused multiply-add the compiler picks on its
# own), so the dequantizers reproduce the reference values exactly.
BASE_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]
# The integer dot product's code path (quant_common.h's QWENRUN_VNNI), from the CPU's flags; the
# flags that enable it join the build key, so a cache shared between machines keeps one build
# per kind. QWENRUN_ISA caps it: "avx2" forces the AVX2 path on a VNNI CPU; "vnni-emulated"
# builds the VNNI branches with vpdpbusd emulated in AVX2 (tests: it runs them on any AVX2 CPU).
ISAS = {  # name -> (CPU flags it needs, extra compiler flags)
    "avx-vnni": ({"avx_vnni"}, ["-mavxvnni", "-DQWENRUN_VNNI=2"]),
    "avx512-vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DQWENRUN_VNNI=1"]),
    # + AMX-INT8 tiles for GGUF linears over many rows (prefill, big batches): gguf_kernels.cpp
    "amx": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"},
            ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile", "-mamx-int8",
             "-DQWENRUN_VNNI=1", "-DQWENRUN_AMX=1"]),
    # the VNNI and tile code structure with vpdpbusd and the tile product emulated in AVX2
    "vnni-emulated": (set(), ["-DQWENRUN_VNNI=3", "-DQWENRUN_AMX=2"]),
    "avx2": (set(), []),
}
# AMX first (its GEMV is the avx512-vnni one), then VEX AVX-VNNI: no AVX-512 code elsewhere
_AUTO_ORDER = ("amx", "avx-vnni", "avx512-vnni", "avx2")
_UNSET = object()
_ops: object = _UNSET
_error: str | None = None


def disabled_by_env() -> bool:
    return os.environ.get("QWENRUN_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported() -> bool:
    """The kernels need AVX2 + FMA + F16C (x86-64 Haswell / Zen1 or newer)."""
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def isa() -> str:
    """The code path the build takes here: the widest the CPU has, or QWENRUN_ISA's choice.

    A request the CPU can't run (e.g. QWENRUN_ISA=avx512-vnni on an AVX2-only CPU) is refused
    with a ValueError rather than built into a binary that would die of SIGILL."""
    want = os.environ.get("QWENRUN_ISA", "").strip().lower() or "auto"
    flags = cpu_flags()
    if want == "auto":
        return next(name for name in _AUTO_ORDER if ISAS[name][0] <= flags)
    if want not in ISAS:
        raise ValueError(f"QWENRUN_ISA={want!r}: expected auto or one of {', '.join(ISAS)}")
    missing = ISAS[want][0] - flags
    if missing:
        raise ValueError(f"QWENRUN_ISA={want}: this CPU lacks {', '.join(sorted(missing))}")
    return want


def cflags() -> list[str]:
    return BASE_CFLAGS + ISAS[isa()][1]


def cache_dir() -> Path:
    root = os.environ.get("QWENRUN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwenrun")
    return Path(root) / "kernels"


def build_name() -> str:
    """Module name keyed by everything that changes the binary: source, torch, flags."""
    import torch

    h = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS))
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(cflags())}".encode())
    return f"qwenrun_quant_{h.hexdigest()[:16]}"


def _load(verbose: bool = False) -> ModuleType:
    import warnings

    from torch.utils import cpp_extension

    name = build_name()
    build_dir = cache_dir() / name
    so = build_dir / f"{name}.so"
    if so.is_file():  # built before: import it directly (~10 ms, no ninja or compiler needed)
        import importlib.machinery
        import importlib.util

        import torch  # noqa: F401  (libtorch must be loaded first)

        try:
            loader = importlib.machinery.ExtensionFileLoader(name, str(so))
            spec = importlib.util.spec_from_file_location(name, so, loader=loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
            return mod
        except (ImportError, OSError):
            pass  # e.g. another process is mid-link: build/load under cpp_extension's lock below
    build_dir.mkdir(parents=True, exist_ok=True)
    log.warning("qwenrun: compiling the quantized CPU kernels once into %s (about a minute)", build_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # copies: load() appends to the flag lists, and a changed list in a second call would
        # bump the in-process version (name_v1), whose new command line makes ninja rebuild
        return cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=cflags(),
                                  extra_ldflags=list(LDFLAGS),
                                  build_directory=str(build_dir), verbose=verbose)


def ops() -> ModuleType | None:
    """The kernel module, built on first use if needed; None when unavailable (see module doc)."""
    global _ops, _error
    if disabled_by_env():
        return None
    if _ops is _UNSET:
        isa()  # a bad QWENRUN_ISA is the user's error to see (ValueError), not a silent fallback
        if not cpu_supported():
            _ops, _error = None, "CPU lacks AVX2/FMA/F16C"
        else:
            try:
                _ops = _load()
            except Exception as e:  # no compiler, no ninja, a build error: fall back, don't crash
                _ops, _error = None, f"{type(e).__name__}: {e}"
                log.warning("quantized kernels unavailable (%s); using the slower PyTorch path",
                            _error.splitlines()[0][:200])
    return _ops  # type: ignore[return-value]


def describe() -> str:
    """Which code path the quantized linears take on this machine, in words."""
    if ops() is None:
        return f"PyTorch fallback ({unavailable_reason()})"
    return f"C++ kernels, {isa()} dot products (int8, int4, GGUF blocks; " + " ".join(cflags()) + ")"


def unavailable_reason() -> str | None:
    if disabled_by_env():
        return "disabled by QWENRUN_NO_KERNELS"
    ops()
    return _error


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qwenrun.quant.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="compile (or reuse) the kernels now")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.build:
        ap.print_help()
        return 0
    if disabled_by_env():
        print("qwenrun: QWENRUN_NO_KERNELS is set; not building the quantized kernels.")
        return 0
    if not cpu_supported():
        print("qwenrun: this CPU lacks AVX2/FMA; quantized models will use the PyTorch path.")
        return 0
    try:
        path = isa()
    except ValueError as e:
        print(f"qwenrun: {e}")
        return 2
    t0 = time.perf_counter()
    try:
        if _ops is _UNSET or _ops is None:  # not loaded in this process yet
            _load(verbose=args.verbose)
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(f"qwenrun: kernel build failed ({type(e).__name__}: {msg[-1] if msg else ''}); "
              "quantized models will use the slower PyTorch path.")
        return 0
    print(f"qwenrun: quantized kernels ({path}) ready in {cache_dir() / build_name()} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
