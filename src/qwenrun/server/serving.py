"""OpenAI requests → engine requests → OpenAI JSON or SSE.

One HTTP request becomes one engine request per prompt (completions may batch prompts; each
engine request carries all ``n`` samples; see engine_requests.py for priming and disconnects).
Requests are never serialized here: every handler only awaits its own streams, and the engine
batches whatever is in flight. Templating and tokenization run on a worker thread, so a
multi-megabyte prompt never stalls the event loop (health probes, other streams). Engine outputs
arrive as deltas and are sent on as they come: nothing here holds a stream's history, except the
text of an answer that may hold tool calls (parsed at its end) and non-streamed answers."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..chat_template import render_chat
from ..engine.async_engine import AsyncLLM, EngineDeadError
from ..errors import RequestFailedError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams, StructuredOutputsParams
from .. import tool_use
from . import tool_calls
from .constraints import request_constraint
from .engine_requests import EngineRequests, engine_error, unless_disconnected
from .limits import RequestLimits
from .logprobs import LogprobFormatter
from .metrics import ServerMetrics
from .protocol import (SAMPLING_FIELDS, APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, bad_request)


log = logging.getLogger("qwenrun.server")
# OpenAI's default for the legacy completions endpoint (vLLM's too); chat runs to the end.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServerMetrics,
                 limits: RequestLimits | None = None) -> None:
        self.llm, self.engine = llm, llm.engine
        self.limits = limits or RequestLimits()
        self.tok = llm.engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.lp = LogprobFormatter(self.tok)

    # -- shared -------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _need_tokenizer(self):
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer: only token-id prompts are possible", param="prompt")
        return self.tok

    def _render(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        """The model's own chat template; a bad conversation or template error is a 400."""
        tok = self._need_tokenizer()
        try:
            return render_chat(tok.chat_template, messages, special_tokens={
                "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}, **kw)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                logprobs: int | None, prompt_logprobs: int | None = None,
                structured: StructuredOutputsParams | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, seed=req.seed,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=req.logit_bias,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=structured)
        except ValueError as e:
            raise bad_request(str(e), SAMPLING_FIELDS) from None

    async def _constraint(self, req: ChatCompletionRequest | CompletionRequest,
                          forced: StructuredOutputsParams | None = None) -> StructuredOutputsParams | None:
        """The request's constraint, compiled now on a worker thread (cached by the engine for
        the request itself): a schema or grammar the engine cannot use is a 400 here, before the
        request exists, never an unconstrained answer."""
        so, field = request_constraint(req, forced)
        if so is None:
            return None
        try:
            await asyncio.to_thread(self.engine.structured.compile, so)
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", param=field, code="invalid_constraint") from None
        return so

    async def _start(self, raw: Request, prefix: str, prompts: list[list[int]],
                     params: SamplingParams) -> EngineRequests:
        run = EngineRequests(self.llm, self.metrics, f"{prefix}-{uuid.uuid4().hex[:16]}", prompts, params)
        try:
            await unless_disconnected(raw, run.start())
        except BaseException:
            run.abort()
            raise
        return run

    async def _collect(self, raw: Request, run: EngineRequests) -> list[RequestOutput]:
        try:
            return await unless_disconnected(raw, run.collect())
        except (EngineDeadError, RequestFailedError) as e:
            raise engine_error(e) from None
        finally:
            run.abort()

    def _stream(self, run: EngineRequests, body: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            try:
                async for event in body():
                    yield event
            except Exception as e:  # noqa: BLE001 - after the 200: report in-band, this stream alone
                if isinstance(e, APIError):
                    err = e
                elif isinstance(e, (EngineDeadError, RequestFailedError, ValueError)):
                    err = engine_error(e)
                else:
                    log.exception("streaming a response failed")
                    err = APIError(500, f"internal error while streaming: {e!r}", code="internal_error")
                yield _sse(err.body())
                yield "data: [DONE]\n\n"
            finally:
                run.abort()  # client gone or error: free the KV blocks now

        # X-Accel-Buffering: proxies (nginx) must not buffer token-by-token events.
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- /v1/chat/completions -----------------------------------------------------------------
    def _prepare_chat(self, req: ChatCompletionRequest, use_tools: bool) -> list[int]:
        """Template + tokenize (on a worker thread). A template without a tools section gets the
        tools as a Hermes-style system prompt (tool_use.py)."""
        tok = self._need_tokenizer()
        prompt = tool_use.render_with_tools(
            self._render, tok.chat_template, tool_calls.messages_for_template(req.message_dicts()),
            req.tools if use_tools else None, continue_final_message=req.continue_final_message,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message)
        return tok.encode(prompt)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        self._need_tokenizer()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        self.limits.check(n=req.n, logit_bias=req.logit_bias, stop=req.stop,
                          logprobs=req.top_logprobs, logprobs_param="top_logprobs")
        try:
            tool_calls.validate_tools(req.tools)
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        try:
            mode = tool_use.tool_choice_mode(req.tools, req.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        use_tools = bool(req.tools) and mode != "none"
        names = tool_calls.tool_names(req.tools)
        forced = None
        if use_tools and mode != "auto":
            forced = tool_use.forced_call_constraint(req.tools, mode, req.parallel_tool_calls,
                                                     tool_use.tag_token_ids(self.tok))
        structured = await self._constraint(req, forced)
        # OpenAI (and vLLM): a call forced by name ends with "stop"; "required" and "auto" calls
        # end with "tool_calls".
        named = forced is not None and mode != "required"

        def finish_reason(calls: list, reason: str | None) -> str | None:
            return reason if named else tool_calls.finish_reason(calls, reason)

        ids = await asyncio.to_thread(self._prepare_chat, req, use_tools)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, max_tokens, top, structured=structured)
        run = await self._start(raw, "chatcmpl", [ids], params)
        rid, created = run.rids[0].rsplit("-", 1)[0], int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name}
        if not req.stream:
            (out,) = await self._collect(raw, run)
            choices = []
            for c in out.outputs:
                content, calls = tool_calls.parse(c.text, names) if use_tools else (c.text, [])
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": c.index, "message": message,
                                "logprobs": ({"content": self.lp.chat(c.token_ids, c.logprobs or [], top)}
                                             if top is not None else None),
                                "finish_reason": finish_reason(calls, c.finish_reason)})
            return JSONResponse({**head, "choices": choices, "usage": run.usage(), "system_fingerprint": None})
        head["object"] = "chat.completion.chunk"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
            return _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            n = params.n
            done = [False] * n
            filters = [tool_calls.StreamFilter(names) for _ in range(n)] if use_tools else None
            texts = [""] * n  # only kept for answers that may hold tool calls (parsed at the end)
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for _, out in run.outputs():  # deltas
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    if filters:
                        texts[i] += c.text
                        delta = filters[i].delta(texts[i])
                    else:
                        delta = c.text
                    lp = None
                    if top is not None and c.token_ids:
                        lp = {"content": self.lp.chat(c.token_ids, c.logprobs or [], top)}
                    if delta or lp:
                        yield chunk(i, {"content": delta}, logprobs=lp)
                    if c.finish_reason is not None:
                        done[i] = True
                        finish = c.finish_reason
                        if filters:
                            rest, calls = filters[i].finish(texts[i])
                            if rest:
                                yield chunk(i, {"content": rest})
                            if calls:
                                yield chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
                            finish = finish_reason(calls, finish)
                        yield chunk(i, {}, finish=finish)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
            yield "data: [DONE]\n\n"

        return self._stream(run, events)

    # -- /v1/completions ----------------------------------------------------------------------
    def _prepare_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """Tokenize the prompt(s) (on a worker thread)."""
        prompts: list[list[int]] = []
        for p in req.prompts():
            prompts.append(self._need_tokenizer().encode(p) if isinstance(p, str) else p)
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty: give at least one token", param="prompt")
        return prompts

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        self.limits.check(n=req.n, logit_bias=req.logit_bias, stop=req.stop, logprobs=req.logprobs)
        prompts = await asyncio.to_thread(self._prepare_prompts, req)
        echo_lp = req.echo and req.logprobs is not None
        if echo_lp:
            self.limits.check_echo_logprobs(req.n, sum(len(p) for p in prompts))
        # echo + logprobs: the prompt's logprobs are part of the answer (first token: None); the
        # engine computes them once per prompt, however many samples share it.
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        structured = await self._constraint(req)
        params = self._params(req, max_tokens, req.logprobs, req.logprobs if echo_lp else None, structured)
        run = await self._start(raw, "cmpl", prompts, params)
        rid, created = run.rids[0].rsplit("-", 1)[0], int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        n, want_lp = params.n, req.logprobs is not None
        echo_text = [self._echo_text(p) if req.echo else "" for p in prompts]
        if not req.stream:
            outs = await self._collect(raw, run)
            choices = []
            for k, out in enumerate(outs):
                for c in out.outputs:
                    lp = None
                    if want_lp:
                        lp = self.lp.completion(c.token_ids, c.logprobs or [],
                                                out.prompt_token_ids if req.echo else None, out.prompt_logprobs)
                    choices.append({"index": k * n + c.index, "text": echo_text[k] + c.text, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
            return JSONResponse({**head, "choices": choices, "usage": run.usage(), "system_fingerprint": None})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            total = len(prompts) * n
            offset, done, started = [0] * total, [False] * total, [False] * total
            prompt_lps: list[Any] = [None] * len(prompts)  # arrive with each prompt's first delta
            async for k, out in run.outputs():  # deltas
                if out.prompt_logprobs is not None:
                    prompt_lps[k] = out.prompt_logprobs
                for c in out.outputs:
                    i = k * n + c.index
                    if done[i]:
                        continue
                    text, lp, echo_ids = c.text, None, None
                    if not started[i]:
                        started[i] = True
                        text = echo_text[k] + text
                        echo_ids = prompts[k] if req.echo else None
                    if want_lp:
                        lp = self.lp.completion(c.token_ids, c.logprobs or [], echo_ids, prompt_lps[k], offset[i])
                        offset[i] += sum(len(t) for t in lp["tokens"])
                    finish = c.finish_reason
                    done[i] = finish is not None
                    if text or finish or (lp and lp["tokens"]):
                        yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                         "finish_reason": finish}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
            yield "data: [DONE]\n\n"

        return self._stream(run, events)

    def _echo_text(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok is not None else ""

    # -- /tokenize, /detokenize (vLLM shapes) --------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """Runs on a worker thread (the route's)."""
        self.check_model(req.model)
        tok = self._need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = req.prompt
        if req.messages is not None:
            text = self._render([m.model_dump(exclude_none=True) for m in req.messages],
                                add_generation_prompt=req.add_generation_prompt)
        ids = tok.encode(text)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        tok = self._need_tokenizer()
        bad = [t for t in req.tokens if not 0 <= t < len(tok)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {len(tok)})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}
