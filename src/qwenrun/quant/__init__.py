"""Weight-only quantization, applied by swapping linears as they load."""
from __future__ import annotations

from collections.abc import Callable

from ..config import EngineConfig


def quantizer_for(cfg: EngineConfig) -> Callable | None:
    if cfg.quantization in (None, "auto"):  # auto: the loader keeps a GGUF's own formats
        return None
    from .linear import make_quantizer

    return make_quantizer(cfg.quantization)
