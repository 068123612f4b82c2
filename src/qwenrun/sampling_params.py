"""SamplingParams: vLLM/OpenAI names, validated on construction (ValueError with a message).

``structured_outputs`` constrains the answer to a JSON schema, any JSON object, a regex, one of a
list of strings, or a grammar (the same fields as vLLM's ``StructuredOutputsParams``); the engine
compiles it into a token mask per step (engine/structured.py).

Fields left as None for temperature, top_p, top_k and repetition_penalty mean "the model's own
default" (generation_config.json) and are filled in by ``resolve()`` when the request is added."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .config import GenerationDefaults

MAX_LOGPROBS = 20


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings, verbatim) or ``grammar``
    (Lark, or GBNF/EBNF with ``::=`` rules)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object is True:
            given.append("json_object")
        elif self.json_object is not False:
            raise ValueError("structured_outputs.json_object must be true or false")
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(self.json, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty string")

    @property
    def kind(self) -> str:
        for k in ("json", "regex", "choice", "grammar"):
            if getattr(self, k) is not None:
                return k
        return "json_object"

    def key(self) -> tuple[str, str]:
        """(kind, canonical spec): what the compile cache is keyed by."""
        k = self.kind
        spec = {"json": self.json, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                "json_object": True}[k]
        return k, spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, ensure_ascii=False)

    @classmethod
    def coerce(cls, value: "StructuredOutputsParams | dict[str, Any] | None") -> "StructuredOutputsParams | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its fields")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"structured_outputs: unknown field(s) {', '.join(sorted(unknown))}; "
                             "use json, json_object, regex, choice or grammar")
        return cls(**value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float | None = None  # HF/CTRL style over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI style over output tokens
    frequency_penalty: float = 0.0
    max_tokens: int | None = None  # None = up to the end of the context
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-k logprobs per generated token (0 = only the sampled one)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature is not None and (not _is_num(self.temperature) or self.temperature < 0):
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not _is_num(self.top_p) or not 0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1):
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and (not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0):
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        stop = self.stop
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            bad("stop must be a string or a list of strings")
        if any(s == "" for s in stops):
            bad("stop strings must not be empty")
        self.stop_strings = stops
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                bad("stop_token_ids must be a list of non-negative token ids")
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias must map token ids to biases")
            parsed = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    bad(f"logit_bias key {k!r} is not a token id")
                if tid < 0 or not _is_num(v) or not -100 <= v <= 100:
                    bad(f"logit_bias[{k}] must be a bias in [-100, 100] for a token id >= 0")
                parsed[tid] = float(v)
            self.logit_bias = parsed
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolve(self, defaults: GenerationDefaults | None) -> "SamplingParams":
        """Fill unset sampling values from the model's generation_config (or neutral values)."""
        d = defaults or GenerationDefaults()
        greedy_default = not d.do_sample
        return replace(
            self,
            temperature=self.temperature if self.temperature is not None else (0.0 if greedy_default else d.temperature),
            top_p=self.top_p if self.top_p is not None else d.top_p,
            top_k=self.top_k if self.top_k is not None else d.top_k,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else d.repetition_penalty,
            stop=list(self.stop_strings),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "stop_strings"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
