"""AsyncLLM: the engine loop on a background thread, one async stream per request.

The engine is single-threaded: every mutation (add, abort) travels to the engine thread as a
command, so the asyncio event loop never blocks on a model step. Outputs come back through
``loop.call_soon_threadsafe`` into per-request asyncio queues. Cancelling a stream (client gone,
task cancelled) aborts its request, which frees its KV blocks at once."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ..config import EngineConfig
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine

log = logging.getLogger("qwenrun")


class QueueFullError(RuntimeError):
    """Too many requests waiting; the server answers 503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an internal error."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.step_count = 0
        self.max_running_seen = 0
        self._adds_queued = 0  # add commands not yet run by the engine thread (aborts don't count)
        self._adds_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="qwenrun-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True, **kw: Any) -> "AsyncLLM":
        return cls(LLMEngine(config, progress=progress), **kw)

    # -- public API ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_pending(self) -> int:
        """Requests waiting for a slot: queued in the engine or not yet handed to it."""
        return self.engine.num_waiting + self._adds_queued

    async def generate(self, prompt: str | None, params: SamplingParams, request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs (cumulative) until the request finishes. Validation errors
        (ValueError) are raised before the first output."""
        rid = request_id or f"req-{next(self._ids)}"
        if self.num_pending >= self.max_waiting:
            raise QueueFullError(f"{self.num_pending} requests are already waiting; retry later")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, q)
        finished = False
        try:
            await asyncio.wrap_future(self._submit_add(rid, prompt, params, prompt_token_ids, time.time()))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def _add(self, *args):
        """engine.add_request on the engine thread, keeping the count of queued adds."""
        with self._adds_lock:
            self._adds_queued -= 1
        return self.engine.add_request(*args)

    def _submit_add(self, *args) -> cf.Future:
        with self._adds_lock:
            self._adds_queued += 1
        try:
            return self._call(self._add, *args)
        except BaseException:
            with self._adds_lock:
                self._adds_queued -= 1
            raise

    def _call(self, fn, *args) -> cf.Future:
        if self.error is not None or self._stop.is_set():
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        fut: cf.Future = cf.Future()
        self._cmds.put((fn, args, fut))
        return fut

    def abort(self, request_id: str) -> None:
        if self.error is None and not self._stop.is_set():
            self._cmds.put((self.engine.abort_request, (request_id,), None))

    async def call(self, fn, *args):
        """Run fn(*args) on the engine thread (e.g. to read consistent engine state)."""
        return await asyncio.wrap_future(self._call(fn, *args))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------
    def _deliver(self, rid: str, item: Any) -> None:
        entry = self._streams.get(rid)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is closed
                pass

    def _run_cmd(self, cmd) -> None:
        fn, args, fut = cmd
        try:
            res = fn(*args)
            if fut is not None:
                fut.set_result(res)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            if fut is not None:
                fut.set_exception(e)

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                block = not eng.has_unfinished_requests()
                try:
                    cmd = self._cmds.get(block=block)
                    while cmd is not None:
                        self._run_cmd(cmd)
                        cmd = self._cmds.get_nowait()
                except queue.Empty:
                    pass
                if self._stop.is_set():
                    break
                if eng.has_unfinished_requests():
                    outs = eng.step()
                    self.step_count += 1
                    self.max_running_seen = max(self.max_running_seen, eng.num_running)
                    for out in outs:
                        self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - report to every stream, then stop
            log.exception("engine loop crashed")
            self.error = e
            err = EngineDeadError(f"engine error: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, err)
        finally:
            for rid in list(eng.requests):  # streams end with finish_reason "abort"
                out = eng.abort_request(rid)
                if out is not None:
                    self._deliver(rid, out)
            while True:  # fail commands that will never run
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd is not None and cmd[2] is not None and not cmd[2].done():
                    cmd[2].set_exception(EngineDeadError("the engine stopped"))
