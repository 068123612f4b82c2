"""The engine requests behind one HTTP request, and the client's side of their lifetime.

Every engine request is *primed* (its first output awaited) before the HTTP status is sent, so
anything the engine rejects (context overflow, bad token ids, a full queue) is a proper 4xx/503,
not an error event inside a 200 stream. A client that goes away aborts its engine requests, which
frees their KV blocks at once: streams are cancelled by starlette's disconnect listener, and
non-streamed requests race a watcher on ``http.disconnect`` (``unless_disconnected``)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from ..engine.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from ..errors import ContextLengthError, RequestFailedError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import ServerMetrics
from .protocol import SAMPLING_FIELDS, APIError, bad_request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response started."""


def engine_error(e: BaseException) -> APIError:
    if isinstance(e, QueueFullError):
        # Retry-After: the queue drains at the engine's pace; 1 s is a polite first back-off.
        return APIError(503, f"the server is busy: {e}", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, RequestFailedError):  # a server-side failure of this request alone
        return APIError(500, f"the request failed: {e}", code="request_failed")
    if isinstance(e, ContextLengthError):  # OpenAI's code for this case, and the field to change
        return APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else "prompt",
                        code="context_length_exceeded")
    if isinstance(e, ValueError):  # the client's mistake (bad token ids, ...)
        return bad_request(str(e), SAMPLING_FIELDS)
    raise e


class EngineRequests:
    """The engine requests behind one HTTP request (one per prompt), merged into one stream of
    ``(prompt_index, delta RequestOutput)`` and observed for /metrics and usage on the way.
    Nothing here keeps a request's history: ``collect`` accumulates it only for non-streamed
    answers, which need all of it."""

    def __init__(self, llm: AsyncLLM, metrics: ServerMetrics, base_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.llm, self.metrics = llm, metrics
        self.rids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.gens = [llm.generate(None, params, rid, prompt_token_ids=ids) for rid, ids in zip(self.rids, prompts)]
        self.first: list[RequestOutput | None] = [None] * len(prompts)
        self.completion_tokens = 0
        self.cached_tokens = [0] * len(prompts)
        self._t_last = [0.0] * len(prompts)
        self._done = [False] * len(prompts)
        self._sample_tokens: list[dict[int, int]] = [{} for _ in prompts]  # per prompt: sample index -> tokens

    async def start(self) -> None:
        """Submit every prompt at once (so they batch) and wait for each first output."""
        results = await asyncio.gather(*(g.__anext__() for g in self.gens), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.abort()
            raise engine_error(errors[0])
        for k, out in enumerate(results):
            self.first[k] = out  # type: ignore[assignment]
            self._observe(k, out)  # type: ignore[arg-type]

    def _observe(self, k: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        new = sum(len(c.token_ids) for c in out.outputs)
        if self._t_last[k]:
            for c in out.outputs:
                self.metrics.observe_itl(now - self._t_last[k], len(c.token_ids))
        self._t_last[k] = now
        self.completion_tokens += new
        self.cached_tokens[k] = out.num_cached_tokens
        counts = self._sample_tokens[k]
        for c in out.outputs:
            counts[c.index] = counts.get(c.index, 0) + len(c.token_ids)
        if out.finished and not self._done[k]:
            self._done[k] = True
            reason = next((c.finish_reason for c in out.outputs if c.finish_reason), None) or "abort"
            self.metrics.observe_finished(out, reason, max(counts.values(), default=0))

    def usage(self) -> dict:
        p, c = self.num_prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens)}}

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The primed first outputs, then every later delta as it arrives."""
        for k, out in enumerate(self.first):
            yield k, out  # type: ignore[misc]
        self.first = [None] * len(self.first)  # handed out: not kept
        if len(self.gens) == 1:  # the common case: no tasks, no queue
            if not self._done[0]:
                async for out in self.gens[0]:
                    self._observe(0, out)
                    yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(k: int) -> None:
            try:
                async for out in self.gens[k]:
                    q.put_nowait((k, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait((k, e))
            finally:
                q.put_nowait((k, None))

        tasks = [asyncio.create_task(pump(k)) for k in range(len(self.gens)) if not self._done[k]]
        try:
            live = len(tasks)
            while live:
                k, item = await q.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self._observe(k, item)
                    yield k, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self) -> list[RequestOutput]:
        """Every prompt's whole output (deltas accumulated), for a non-streamed answer."""
        acc: list[RequestOutput | None] = [None] * len(self.rids)
        async for k, out in self.outputs():
            if acc[k] is None:
                acc[k] = out
            else:
                acc[k].add(out)  # type: ignore[union-attr]
        return acc  # type: ignore[return-value]

    def abort(self) -> None:
        """Abort what has not finished. Synchronous on purpose: it runs in ``finally`` blocks of
        cancelled tasks, where anyio re-cancels every await."""
        for k, rid in enumerate(self.rids):
            if not self._done[k]:
                self._done[k] = True
                self.llm.abort(rid)
                self.metrics.request_success.labels(self.metrics.model_name, "abort").inc()


async def unless_disconnected(raw: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client disconnects first (then it is cancelled: ClientGone)."""
    task = asyncio.ensure_future(aw)

    async def watch() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()
