"""``speculative_config`` (vLLM's names), parsed and checked once at the edge (pure Python).

* ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}``:
  prompt lookup — the continuation of the latest earlier occurrence of the sequence's last n-gram
  (n from max down to min) in its own prompt + output.
* ``{"method": "draft_model", "model": path, "num_speculative_tokens": k}``: a smaller checkpoint
  with the same tokenizer proposes k tokens greedily.

Either way the target model verifies the proposals in one forward (engine/spec_decode.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
    "draft_model": {"method", "num_speculative_tokens", "model", "quantization", "dtype"},
}
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None  # draft_model: the draft checkpoint
    quantization: str | None = None  # draft_model: its weights (None = dense)
    dtype: str = "auto"

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """A dict, a JSON string, a SpeculativeConfig or None → SpeculativeConfig or None;
        ValueError naming the problem otherwise."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object such as "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        method = value.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {method!r}")
        unknown = sorted(set(value) - _KEYS[method])
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) for method {method!r}: {', '.join(unknown)}")
        k = value.get("num_speculative_tokens")
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if method == "ngram":
            hi = value.get("prompt_lookup_max", 3)
            lo = value.get("prompt_lookup_min", 1)
            for name, v in (("prompt_lookup_max", hi), ("prompt_lookup_min", lo)):
                if not _is_int(v) or v < 1:
                    raise ValueError(f"speculative_config.{name} must be a positive integer, got {v!r}")
            if lo > hi:
                raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) is larger than "
                                 f"prompt_lookup_max ({hi})")
            return cls(method, k, prompt_lookup_max=hi, prompt_lookup_min=lo)
        model = value.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("speculative_config.model (the draft checkpoint) is required for method 'draft_model'")
        quant = value.get("quantization")
        if quant not in (None, "int8", "int4"):
            raise ValueError(f"speculative_config.quantization must be null, 'int8' or 'int4', got {quant!r}")
        dtype = value.get("dtype", "auto")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"speculative_config.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return cls(method, k, model=model, quantization=quant, dtype=dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
