"""Structured output: constraints compiled once, a grammar matcher per sequence, masks per step.

The grammar engine is llguidance (chosen by measurement over xgrammar, see BENCHMARKS.md: on the
151,643-token Qwen vocabulary both compute a mask in well under 0.1 ms per token on average, but
llguidance compiles a typical schema in ~2 ms rather than ~40 ms, speaks Lark with embedded JSON
schemas, which the forced tool-call grammar needs, and depends on neither torch nor triton).

* ``GrammarCompiler`` turns a ``StructuredOutputsParams`` into a checked, never-advanced matcher,
  cached by (kind, spec); every sequence starts from a cheap ``deep_copy`` of it. Its tokenizer is
  built from our own ``tokenizer.json`` text (never downloaded), once, on the first constraint.
* ``GrammarState`` lives on the sequence: advanced once per appended token (so a preempted
  sequence, which keeps its tokens and is recomputed, keeps a matching state), and terminated when
  the grammar can go no further, which ends the sequence with finish_reason "stop".
* ``apply_masks`` sets the disallowed logits of the constrained rows to -inf in place; EOS is
  allowed exactly when the grammar may end there. Unconstrained rows and batches pay nothing."""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # distinct constraints kept compiled (LRU)
# Fixed separators (", " and ": ") and no free whitespace: small models otherwise wander into
# endless runs of newlines inside a JSON object, which is valid but never ends.
_JSON_OPTIONS = {"whitespace_flexible": False}


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - llguidance is a core dependency
        raise ValueError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


def _lark_literal(text: str) -> str:
    """A Lark string literal for ``text`` (JSON escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def grammar_source(so: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a constraint (not yet checked)."""
    llg = _llg()
    kind = so.kind
    if kind == "json":
        try:
            return llg.LLMatcher.grammar_from_json_schema(so.json, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.json: the JSON schema cannot be used: {e}") from None
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(so.regex)
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in so.choice))
    text = so.grammar
    if re.search(r"^\s*[\w-]+\s*::=", text, re.M):  # GBNF / EBNF rules (vLLM's guided_grammar)
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions on bad input
            raise ValueError(f"structured_outputs.grammar: the EBNF grammar does not parse: {e}") from None
    return llg.LLMatcher.grammar_from_lark(text)


class GrammarState:
    """One sequence's matcher. Not thread-safe: only the engine thread touches it."""

    __slots__ = ("matcher", "error")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.error: str | None = None

    def accept(self, token_id: int) -> None:
        if self.error is None and not self.matcher.consume_token(token_id):
            self.error = self.matcher.get_error() or f"token {token_id} is not allowed by the grammar"

    @property
    def terminated(self) -> bool:
        """Nothing can follow: the sequence ends here."""
        return self.matcher.is_stopped()

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the next-token bitmask (int32 words, bit i = token i allowed) into ``row``."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class GrammarCompiler:
    """Compile and cache constraints for one tokenizer. Thread-safe: the server compiles on a
    worker thread (so a bad constraint is a 400 before the request exists), the engine thread
    then finds it in the cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int] | set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lltok: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    @property
    def lltokenizer(self) -> Any:
        if self._lltok is None:
            with self._lock:
                if self._lltok is None:
                    if self.tokenizer is None:
                        raise ValueError("structured output needs a tokenizer; this model has none")
                    self._lltok = self.tokenizer.llguidance_tokenizer(self.vocab_size, self.eos_token_ids)
        return self._lltok

    def compile(self, so: StructuredOutputsParams) -> Any:
        """The checked, never-advanced matcher for ``so`` (ValueError naming the problem)."""
        key = so.key()
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto
        llg = _llg()
        source = grammar_source(so)
        tok = self.lltokenizer
        matcher = llg.LLMatcher(tok, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{so.kind}: {_first_line(matcher.get_error())}")
        with self._lock:
            self._cache[key] = matcher
            self.num_compiled += 1
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def new_state(self, so: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self.compile(so).deep_copy())


def _first_line(msg: str) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else "the constraint does not compile"


def apply_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """logits[rows[k]] keeps only the tokens states[k] allows (others -inf), in place."""
    V = logits.shape[1]
    words = (V + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    for k, st in enumerate(states):
        st.fill_mask(bitmask[k])
    # Little-endian words: byte j of word w holds tokens 32w + 8j .. 32w + 8j + 7, low bit first.
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V]
    banned = torch.from_numpy(allowed).to(logits.device) == 0
    for k, r in enumerate(rows):
        row = logits[r]
        row.masked_fill_(banned[k], float("-inf"))
