"""What a request returns: RequestOutput with one CompletionOutput per sample (``n``).

An engine request asks for its outputs in one of three kinds (``OutputKind``): ``cumulative``
(every output holds everything so far, as the sync ``LLM.stream`` yields), ``delta`` (each output
holds only what is new since the previous one: what the server streams, so no step ever copies a
request's whole history) and ``final`` (one output, at the end: ``LLM.generate``).
``RequestOutput.add`` folds a delta into an accumulated output (and merges two deltas, which is
how a stream whose reader falls behind keeps O(1) pending outputs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class OutputKind(Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL = "final"

# Per generated token: {token_id: logprob} holding the sampled token and the top-k alternatives.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: "CompletionOutput") -> None:
        """Append a later delta of the same sample (in place)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = field(default=0)
    error: str | None = None  # set when the request failed inside the engine (finished is True)

    def add(self, delta: "RequestOutput") -> None:
        """Fold a later delta of the same request into this output (in place). Samples the delta
        does not mention keep what they have."""
        mine = {c.index: c for c in self.outputs}
        appended = False
        for c in delta.outputs:
            if c.index in mine:
                mine[c.index].add(c)
            else:
                self.outputs.append(c)
                mine[c.index] = c
                appended = True
        if appended:  # per-step merges of known samples need no re-sort
            self.outputs.sort(key=lambda c: c.index)
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finished = delta.finished
        self.metrics = delta.metrics or self.metrics
        self.num_cached_tokens = delta.num_cached_tokens
        self.error = delta.error or self.error
