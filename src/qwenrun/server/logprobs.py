"""Engine logprobs ({token_id: logprob} per token) → OpenAI's two logprob shapes.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
Completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.
A token that is part of a multi-byte character decodes to U+FFFD on its own; ``bytes`` carries the
exact bytes, as OpenAI does. -inf (a token masked out) is clamped to -9999.0 because JSON has no
infinity."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from ..tokenizer import Tokenizer

_FLOOR = -9999.0


def _finite(lp: float | None) -> float:
    return _FLOOR if lp is None or not math.isfinite(lp) else max(lp, _FLOOR)


class LogprobFormatter:
    def __init__(self, tok: Tokenizer | None) -> None:
        self.tok = tok
        self.token_str = lru_cache(maxsize=65536)(self._token_str)

    def _token_str(self, tid: int) -> str:
        if self.tok is None:
            return f"token_id:{tid}"
        return self.tok.decode([tid])

    def _bytes(self, tid: int) -> list[int]:
        return list(self.tok.token_bytes(tid)) if self.tok is not None else []

    def _top(self, d: dict[int, float], k: int) -> list[tuple[int, float]]:
        # The engine's dict holds the sampled token plus the top-k; it may be one over k.
        return sorted(d.items(), key=lambda kv: -kv[1])[:k]

    def _top_dict(self, d: dict[int, float]) -> dict[str, float]:
        return {self.token_str(t): _finite(lp) for t, lp in self._top(d, len(d))}

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> list[dict[str, Any]]:
        content = []
        for tid, d in zip(token_ids, logprobs):
            content.append({
                "token": self.token_str(tid), "logprob": _finite(d.get(tid)), "bytes": self._bytes(tid),
                "top_logprobs": [{"token": self.token_str(t), "logprob": _finite(lp), "bytes": self._bytes(t)}
                                 for t, lp in self._top(d, top)],
            })
        return content

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float]],
                   prompt_ids: list[int] | None = None, prompt_logprobs: list[dict[int, float] | None] | None = None,
                   offset: int = 0) -> dict[str, Any]:
        """``prompt_ids`` (echo): the prompt's tokens come first, the very first with logprob None.
        ``top_logprobs`` holds the top-k *and* the sampled token (up to k + 1 entries), as OpenAI's
        legacy completions do."""
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if prompt_ids is not None:
            plp = prompt_logprobs or []
            for j, tid in enumerate(prompt_ids):
                d = plp[j] if j < len(plp) else None
                tokens.append(self.token_str(tid))
                token_lps.append(None if d is None else _finite(d.get(tid)))
                tops.append(None if d is None else self._top_dict(d))
        for tid, d in zip(token_ids, logprobs):
            tokens.append(self.token_str(tid))
            token_lps.append(_finite(d.get(tid)))
            tops.append(self._top_dict(d))
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
