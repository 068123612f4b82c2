"""AsyncLLM: the engine loop on a background thread, one async stream per request.

The engine is single-threaded: every mutation (add, abort) travels to the engine thread as a
command, so the asyncio event loop never blocks on a model step. Outputs come back through
``loop.call_soon_threadsafe`` into one pending slot per request.

What keeps the loop alive and memory bounded, whatever clients do:
- A command's caller may be gone (its future cancelled) by the time the engine thread reaches
  it: a cancelled command never runs, and nothing a command raises escapes the loop.
- Outputs are deltas (new tokens, logprobs and text only). A reader that falls behind finds
  them merged into one pending output: O(1) outputs pending per stream, whose size is what it
  has not read yet, never a copy of the request's history per step.
- A failed model step fails the requests in it (LLMEngine); ``max_step_failures`` failed steps in
  a row mean the device or model is broken: the engine stops, ``healthy`` turns False, every
  stream ends with EngineDeadError and ``on_fatal`` is called (the server then exits non-zero)."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..config import EngineConfig
from ..errors import RequestFailedError
from ..outputs import OutputKind, RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine

log = logging.getLogger("qwenrun")


class QueueFullError(RuntimeError):
    """Too many requests waiting; the server answers 503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an internal error."""


class _Stream:
    """One request's outputs on its event loop: deltas merged while the reader is behind."""

    __slots__ = ("pending", "error", "event")

    def __init__(self) -> None:
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def push(self, out: RequestOutput) -> None:
        if self.pending is None:
            self.pending = out
        else:
            self.pending.add(out)  # coalesce: still one pending output
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


def _settle(fut: cf.Future, set_fn: Callable[[Any], None], value: Any) -> None:
    try:
        set_fn(value)
    except cf.InvalidStateError:  # settled meanwhile (e.g. the engine stopped): nobody waits
        pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, max_step_failures: int = 3,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_step_failures = max_step_failures
        self.on_fatal = on_fatal
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Stream]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.step_count = 0
        self.max_running_seen = 0
        self._adds_queued = 0  # add commands not yet run by the engine thread (aborts don't count)
        self._adds_lock = threading.Lock()
        self._cmd_lock = threading.Lock()  # "not stopped" check + put vs. stop + drain: no command is orphaned
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
    def healthy(self) -> bool:
        """False once the engine thread has stopped (after a fatal error or shutdown)."""
        return self.error is None and not self._stop.is_set() and self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        """Requests waiting for a slot: queued in the engine or not yet handed to it."""
        return self.engine.num_waiting + self._adds_queued

    async def generate(self, prompt: str | None, params: SamplingParams, request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs as *deltas*: each holds the tokens, logprobs and text that
        are new since the previous one (``RequestOutput.add`` accumulates them); the last has
        ``finished``. Validation errors (ValueError) are raised before the first output; a
        request that fails inside the engine raises RequestFailedError."""
        rid = request_id or f"req-{next(self._ids)}"
        if self.num_pending >= self.max_waiting:
            raise QueueFullError(f"{self.num_pending} requests are already waiting; retry later")
        stream = _Stream()
        self._streams[rid] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            await asyncio.wrap_future(self._submit_add(rid, prompt, params, prompt_token_ids, time.time()))
            while True:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                out, stream.pending = stream.pending, None
                if out is None:
                    continue
                if out.error is not None:
                    finished = True
                    raise RequestFailedError(out.error)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def _add(self, rid: str, prompt: str | None, params: SamplingParams, ids: list[int] | None,
             arrival: float) -> None:
        self.engine.add_request(rid, prompt, params, prompt_token_ids=ids, arrival_time=arrival,
                                output_kind=OutputKind.DELTA)

    def _submit_add(self, *args) -> cf.Future:
        with self._adds_lock:
            self._adds_queued += 1
        try:
            return self._call(self._add, *args, counts_as_add=True)
        except BaseException:
            with self._adds_lock:
                self._adds_queued -= 1
            raise

    def _call(self, fn, *args, counts_as_add: bool = False) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._cmd_lock:
            if self.error is not None or self._stop.is_set():
                raise EngineDeadError(f"the engine is not running ({self.error!r})")
            self._cmds.put((fn, args, fut, counts_as_add))
        return fut

    def abort(self, request_id: str) -> None:
        """Abort a request (its KV blocks are freed on the engine thread); safe at any moment."""
        if self.error is None and not self._stop.is_set():
            self._cmds.put((self.engine.abort_request, (request_id,), None, False))

    async def call(self, fn, *args):
        """Run fn(*args) on the engine thread (e.g. to read consistent engine state)."""
        return await asyncio.wrap_future(self._call(fn, *args))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------
    def _send(self, rid: str, method: str, item: Any) -> None:
        entry = self._streams.get(rid)
        if entry is not None:
            loop, stream = entry
            try:
                loop.call_soon_threadsafe(getattr(stream, method), item)
            except RuntimeError:  # the event loop is closed
                pass

    def _run_cmd(self, cmd) -> None:
        fn, args, fut, counts_as_add = cmd
        if counts_as_add:
            with self._adds_lock:
                self._adds_queued -= 1
        # A caller that is gone (its future cancelled while the command waited) is never served:
        # an add that nobody awaits is not added at all, so it cannot hold blocks.
        if fut is not None and not fut.set_running_or_notify_cancel():
            return
        try:
            res = fn(*args)
        except BaseException as e:  # noqa: BLE001 - the caller's error, never the loop's
            if fut is not None:
                _settle(fut, fut.set_exception, e)
            else:
                log.exception("engine command %s failed", getattr(fn, "__name__", fn))
            return
        if fut is not None:
            _settle(fut, fut.set_result, res)

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
                        self._send(out.request_id, "push", out)
                    if eng.consecutive_step_failures >= self.max_step_failures:
                        raise EngineDeadError(f"{eng.consecutive_step_failures} model steps failed in a row; "
                                              "the engine cannot continue")
        except BaseException as e:  # noqa: BLE001 - report to every stream, then stop
            log.exception("engine loop crashed")
            self.error = e
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(f"engine error: {e!r}")
            for rid in list(self._streams):
                self._send(rid, "fail", err)
        finally:
            with self._cmd_lock:
                self._stop.set()
            try:
                for rid in list(eng.requests):  # streams end with finish_reason "abort"
                    out = eng.abort_request(rid)
                    if out is not None:
                        self._send(rid, "push", out)
            except Exception:  # noqa: BLE001 - the engine is going away either way
                log.exception("aborting requests at engine stop failed")
            while True:  # fail commands that will never run
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd is not None and cmd[2] is not None and cmd[2].set_running_or_notify_cancel():
                    _settle(cmd[2], cmd[2].set_exception, EngineDeadError("the engine stopped"))
            if self.error is not None and self.on_fatal is not None:
                try:
                    self.on_fatal(self.error)
                except Exception:  # noqa: BLE001
                    log.exception("on_fatal callback failed")
