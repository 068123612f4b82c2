"""``qwenrun serve``: the FastAPI app, its guard middleware, and the process around it.

The HTTP listener starts at once and the model loads on a background thread: /health answers
503 (and inference routes 503 with Retry-After) until it is ready, so orchestrators can tell
"starting" from "dead". SIGTERM (uvicorn's handler) stops accepting connections, lets in-flight
requests finish for up to --shutdown-grace seconds, cancels the rest (which aborts their engine
requests), stops the engine thread and exits 0. If the engine itself dies (model steps failing
in a row: a broken device), /health turns 503 at once, the server drains and exits 1, so a
service manager restarts it.

Request bodies are parsed (JSON, then the pydantic models) on a worker thread: a multi-megabyte
body never stalls the event loop. /openapi.json describes the real request bodies."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import ServerConfig
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse,
                       TokenizeRequest, error_body, validation_error)
from .tokenizer_info import add_tokenizer_info_route
from .web import add_web_ui

log = logging.getLogger("qwenrun.server")
M = TypeVar("M", bound=BaseModel)
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # /health and /metrics stay open (probes, scrapers)


class ServerState:
    """What the routes need; ``serving`` is None until the model has loaded."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.model_name: str = cfg.model_name
        self.llm: Any = None
        self.serving: Any = None
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.model_name, lambda: self.llm)
        self.server: Any = None  # the uvicorn.Server, told to exit if loading fails or the engine dies
        self.engine_error: BaseException | None = None
        self.chat_template: str | None = None  # --chat-template: replaces the model's own
        if cfg.chat_template:
            try:
                self.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"--chat-template: cannot read {cfg.chat_template}: {e}") from None
        self.limits = cfg.request_limits()

    def ready(self):
        if self.llm is not None and not self.llm.healthy:
            raise APIError(503, f"the engine has stopped ({self.llm.error!r}); the server is shutting down",
                           code="engine_dead")
        if self.serving is None:
            msg = ("the model failed to load" if self.load_error is not None
                   else f"the model {self.model_name} is still loading; retry shortly")
            raise APIError(503, msg, code="model_loading", headers={"Retry-After": "5"})
        return self.serving

    def load(self) -> None:
        """Runs on the loader thread."""
        try:
            from ..engine.async_engine import AsyncLLM
            from .serving import OpenAIServing

            cfg = self.cfg.engine
            t0 = time.perf_counter()
            llm = AsyncLLM.from_config(cfg, progress=True, max_waiting=self.cfg.max_waiting,
                                       on_fatal=self._engine_died)
            lm = llm.engine.loaded
            if self.chat_template is not None and llm.engine.tokenizer is not None:
                llm.engine.tokenizer.chat_template = self.chat_template
            print(f"Loaded {lm.name} ({lm.weight_bytes / 2**30:.2f} GiB, {str(lm.dtype).replace('torch.', '')}"
                  f"{', ' + lm.quantization if lm.quantization else ''}, {lm.device}) in "
                  f"{time.perf_counter() - t0:.1f}s. {llm.engine.plan.report()}. Serving it as "
                  f"'{self.model_name}'.", file=sys.stderr, flush=True)
            self.serving = OpenAIServing(llm, self.model_name, self.metrics, self.limits)
            self.llm = llm
        except BaseException as e:  # noqa: BLE001 - reported by serve_main after the server stops
            self.load_error = e
            log.error("loading %s failed: %s", self.cfg.engine.model, e)
            if self.server is not None:
                self.server.should_exit = True


    def _engine_died(self, e: BaseException) -> None:
        """Engine thread: it cannot continue. Drain and exit non-zero (serve_main)."""
        self.engine_error = e
        log.error("the engine stopped: %r; shutting down so a supervisor can restart the server", e)
        if self.server is not None:
            self.server.should_exit = True


class Guard:
    """Pure ASGI middleware (BaseHTTPMiddleware would break streaming and disconnect detection):
    counts responses by status, checks the API key, and bounds the request body by both the
    declared Content-Length and the bytes actually received (chunked uploads have no length)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.cfg.api_key
        self.key = f"Bearer {key}".encode() if key else None
        self.max_body = state.cfg.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.state.metrics

        async def counted_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                metrics.count_http(msg["status"])
            await send(msg)

        headers = dict(scope["headers"])
        path: str = scope["path"]
        if self.key is not None and path.startswith(_PROTECTED):
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.key):
                what = "a wrong API key was given" if got else "no API key was given"
                return await _reply(APIError(401, f"Unauthorized: {what} (send 'Authorization: Bearer <key>')",
                                             code="invalid_api_key"), scope, receive, counted_send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _reply(APIError(400, "invalid Content-Length header"), scope, receive, counted_send)
        if declared > self.max_body:
            return await _reply(_too_large(declared, self.max_body), scope, receive, counted_send)
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _too_large(seen, self.max_body)  # becomes a 413 through the handler
            return msg

        await self.app(scope, bounded_receive, counted_send)


def _too_large(n: int, limit: int) -> APIError:
    return APIError(413, f"the request body ({n}+ bytes) is larger than the limit of {limit} bytes "
                         f"(--max-body-bytes)", code="request_too_large")


async def _reply(err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(err.body(), err.status, headers=err.headers)(scope, receive, send)


def _decode(body: bytes, model: type[M]) -> M:
    """Bytes → request model (on a worker thread). Every failure is an OpenAI-shaped 400."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    if b"\\ud" in body.lower():  # a \uD800-\uDFFF escape: only valid as half of a pair
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without "
                                "its pair), which is not Unicode text") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


async def parse_body(raw: Request, model: type[M]) -> M:
    """JSON body → request model, parsed off the event loop."""
    from starlette.requests import ClientDisconnect

    from .engine_requests import ClientGone

    try:
        body = await raw.body()
    except ClientDisconnect:  # gone while sending its body: nothing to answer, nothing to log
        raise ClientGone() from None
    if len(body) < 4096:  # small bodies: a thread hop costs more than parsing
        return _decode(body, model)
    return await asyncio.to_thread(_decode, body, model)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that parses ``model`` itself (see parse_body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


_ERRORS = {code: {"model": ErrorResponse, "description": what} for code, what in (
    (400, "Invalid request (OpenAI-shaped error)"), (401, "Missing or wrong API key"),
    (404, "Unknown model"), (413, "Request body too large"), (503, "Loading, busy or stopping"))}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models the routes parse themselves."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title="qwenrun", version=_version(), routes=app.routes,
                             description="OpenAI-compatible API of qwenrun")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for m in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
            js = m.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[m.__name__] = js
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qwenrun")
    except Exception:  # noqa: BLE001
        return "0"


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="qwenrun-loader", daemon=True).start()
        yield
        if state.llm is not None:  # after uvicorn's grace period: stop the engine thread
            await asyncio.to_thread(state.llm.shutdown)

    app = FastAPI(title="qwenrun", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{loc}: {first['msg']}" if loc else first["msg"], param=loc or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(msg, "invalid_request_error", None, code), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> Response:
        log.exception("internal error")
        return JSONResponse(error_body(f"internal server error: {e!r}", "server_error", None, "internal_error"), 500)

    from .engine_requests import ClientGone

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        """200 when requests are served; 503 while loading, and once the engine has died."""
        state.ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        card: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created,
                                "owned_by": "qwenrun", "root": state.cfg.engine.model}
        if state.llm is not None:
            card["max_model_len"] = state.llm.engine.max_model_len
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(ChatCompletionRequest), responses=_ERRORS)
    async def chat(raw: Request) -> Response:
        serving = state.ready()
        return await serving.chat(await parse_body(raw, ChatCompletionRequest), raw)

    @app.post("/v1/completions", openapi_extra=_body_doc(CompletionRequest), responses=_ERRORS)
    async def completions(raw: Request) -> Response:
        serving = state.ready()
        return await serving.completions(await parse_body(raw, CompletionRequest), raw)

    @app.post("/tokenize", openapi_extra=_body_doc(TokenizeRequest), responses=_ERRORS)
    async def tokenize(raw: Request) -> Response:
        serving = state.ready()
        req = await parse_body(raw, TokenizeRequest)
        return JSONResponse(await asyncio.to_thread(serving.tokenize, req))

    @app.post("/detokenize", openapi_extra=_body_doc(DetokenizeRequest), responses=_ERRORS)
    async def detokenize(raw: Request) -> Response:
        serving = state.ready()
        req = await parse_body(raw, DetokenizeRequest)
        return JSONResponse(await asyncio.to_thread(serving.detokenize, req))

    add_tokenizer_info_route(app, state)
    if state.cfg.web_ui:
        add_web_ui(app)
    return app


def serve_main(cfg: ServerConfig) -> int:
    import uvicorn

    state = ServerState(cfg)
    # h11 and asyncio, named: installing ray[serve] brings httptools and uvloop, which uvicorn's
    # "auto" would otherwise switch to; the single server stays the one its tests describe.
    config = uvicorn.Config(build_app(state), host=cfg.host, port=cfg.port, log_level="info", http="h11",
                            loop="asyncio", timeout_graceful_shutdown=cfg.shutdown_grace, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    state.server = server
    # uvicorn re-raises the signal it shut down on after restoring the previous handler; with
    # Python's default SIGTERM handler the process would then die by signal. A no-op handler
    # makes a graceful SIGTERM shutdown exit 0, as service managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"qwenrun: serving '{state.model_name}' on http://{cfg.host}:{cfg.port} (loading the model…)",
          file=sys.stderr, flush=True)
    server.run()
    if state.load_error is not None:
        raise state.load_error  # the CLI prints a ValueError as one line and exits 2
    if state.engine_error is not None:
        print(f"qwenrun: the engine stopped ({state.engine_error!r}); exiting with status 1", file=sys.stderr)
        return 1
    return 0
