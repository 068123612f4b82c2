"""``qwenrun serve MODEL --replicas N``: N engine replicas on Ray Serve behind one OpenAI endpoint.

Two Serve deployments make one application:

- ``QwenrunReplica`` (N replicas, each a Ray actor with its own CPUs or GPU): a full qwenrun server
  in-process — the same FastAPI app as ``qwenrun serve`` (server/app.py) over its own AsyncLLM and
  KV cache — driven through ``handle_http`` (one HTTP request in, its response streamed out). Serve
  health-checks it (``check_health``: the engine thread is alive) and replaces a replica that dies.
- ``QwenrunIngress`` (one replica, no model) behind Serve's HTTP proxy on ``--host/--port``: API
  key and body-size checks (the same Guard as the single server), /health and /metrics for the
  whole set, the chat page, and every other route forwarded to a replica through a Serve
  DeploymentHandle. The handle's replica choice is Serve's, ranked by our custom request router
  (ray_router.PrefixAffinityRouter) on a routing key: the conversation text, so a shared system
  prompt or a continued conversation lands where its KV blocks are cached.

Faults: a replica that dies mid-request ends that request with an OpenAI-shaped 503 (an error event
when the stream has started); the handle stops routing to it at once and Serve starts a
replacement. A client that disconnects cancels the handle call, which Serve propagates to the
replica as a cancellation: the replica's app sees ``http.disconnect`` and aborts the engine
request (KV blocks freed). SIGTERM deletes the application (replicas drain for --shutdown-grace
seconds), stops Serve and the local Ray cluster, and exits 0.

For Ray users: ``build_app`` is a Serve application builder (``serve run
qwenrun.server.ray_serve:build_app model=demo replicas=2``, or a Serve config file; see
deploy/ray-serve.yaml)."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import ClientDisconnect

from ..config import EngineConfig
from ..settings import RayConfig, ServerConfig
from .app import Guard
from .protocol import APIError, error_body
from .ray_router import KEY_KW
from .web import add_web_ui

log = logging.getLogger("qwenrun.server")

REPLICA_HEADER = "x-qwenrun-replica"
MAX_KEY_CHARS = 32768  # routing looks at the first 32K characters (about 8K tokens) of a conversation
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"content-length"}


# -- the routing key ------------------------------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else json.dumps(content, sort_keys=True, default=str)


def routing_key(path: str, body: bytes) -> str:
    """What the prompt will start with, as text: tools then messages (chat), or the prompt
    (completions). Two requests whose keys share a prefix share the prompt tokens of that prefix,
    so their KV blocks are reusable. A body that is not a JSON object gives "" (any replica; it
    answers the 400 itself)."""
    if not path.endswith(("/chat/completions", "/completions")) or not body:
        return ""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    if "messages" in obj:
        if obj.get("tools"):
            parts.append(json.dumps(obj["tools"], sort_keys=True, default=str))
        for m in obj["messages"] if isinstance(obj["messages"], list) else []:
            if isinstance(m, dict):
                parts.append(f"\x1e{m.get('role')}\x1f{_text(m.get('content'))}")
    else:
        p = obj.get("prompt")
        if isinstance(p, list) and len(p) == 1:  # a batch of one prompt
            p = p[0]
        parts.append(p if isinstance(p, str) else json.dumps(p) if isinstance(p, list) else "")
    key = "".join(parts)
    return key[:MAX_KEY_CHARS]


# -- the engine replicas --------------------------------------------------------------------------
class QwenrunReplica:
    """One engine replica: qwenrun's single-process server app, minus the socket."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .app import ServerState, build_app

        cfg = ServerConfig(**config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state = ServerState(cfg)
        self.state.load()  # blocking: Serve counts the replica as starting until the model is in
        if self.state.load_error is not None:
            raise self.state.load_error
        self.app = build_app(self.state)  # its lifespan never runs: the engine is already loaded
        self._header = (REPLICA_HEADER.encode(), self.replica_id.encode())

    async def handle_http(self, req: dict[str, Any], prefix: str = ""):
        """Run one HTTP request through the app; yield ``(status, headers)``, then body chunks.
        Cancellation (the client went away) is delivered to the app as ``http.disconnect``."""
        del prefix  # the router's, not ours
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
                 "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(),
                 "query_string": req.get("query", b""), "root_path": "", "headers": req["headers"],
                 "client": req.get("client"), "server": None}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            out.put_nowait(msg)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                out.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            msg = await out.get()
            if msg is None:
                raise RuntimeError("the app sent no response")
            yield msg["status"], [*msg.get("headers", []), self._header]
            while True:
                msg = await out.get()
                chunks = []
                while msg is not None:  # coalesce what is already queued into one item
                    if msg["type"] == "http.response.body":
                        chunks.append(msg.get("body", b""))
                        if not msg.get("more_body", False):
                            msg = None
                            break
                    if out.empty():
                        break
                    msg = out.get_nowait()
                if chunks:
                    yield b"".join(chunks)
                if msg is None:
                    return
        finally:
            gone.set()  # the app's disconnect listeners abort the engine requests
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    task.cancel()
                except Exception:  # noqa: BLE001 - the app logs its own errors
                    pass

    async def metrics(self, target: str) -> dict[str, Any]:
        """This replica's /metrics text (the ingress aggregates them); ``target`` is the router's."""
        del target
        llm = self.state.llm
        return {"replica": self.replica_id, "healthy": bool(llm is not None and llm.healthy),
                "text": self.state.metrics.render().decode()}

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        llm = self.state.llm
        if llm is None or not llm.healthy:
            raise RuntimeError(f"the engine of replica {self.replica_id} has stopped ({getattr(llm, 'error', None)!r})")

    def __del__(self) -> None:
        llm = getattr(getattr(self, "state", None), "llm", None)
        if llm is not None:
            llm.shutdown(timeout=2.0)


# -- the HTTP front ------------------------------------------------------------------------------
class _IngressMetrics:
    """The ingress's own counters (HTTP statuses, replica counts) plus every replica's families,
    each sample labelled with its replica."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("qwenrun:http_requests", "HTTP responses by status code.", ["status"],
                                     registry=self.registry)

    def count_http(self, status: int) -> None:
        self.http_requests.labels(str(status)).inc()

    def render(self, replicas: list[dict[str, Any]], healthy: int, total: int) -> bytes:
        from prometheus_client import generate_latest
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        for rep in replicas:
            for fam in text_string_to_metric_families(rep["text"]):
                if fam.name == "qwenrun:http_requests":  # counted once, here at the front
                    continue
                m = merged.get(fam.name)
                if m is None:
                    m = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    m.samples.append(type(s)(s.name, {**s.labels, "replica": rep["replica"]}, s.value,
                                             s.timestamp, s.exemplar))
        g = GaugeMetricFamily("qwenrun:replicas_healthy", "Engine replicas Serve reports running.",
                              labels=["model_name"])
        g.add_metric([self.model_name], healthy)
        t = GaugeMetricFamily("qwenrun:replicas_total", "Engine replicas configured (--replicas).",
                              labels=["model_name"])
        t.add_metric([self.model_name], total)

        class _Fixed:
            def collect(self_inner):
                yield g
                yield t
                yield from merged.values()

        from prometheus_client import CollectorRegistry

        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Fixed())
        return generate_latest(self.registry) + generate_latest(reg)


class QwenrunIngress:
    """Serve's HTTP proxy hands every request here (one replica; it loads no model)."""

    def __init__(self, engine: Any, config: dict[str, Any]) -> None:
        self.engine = engine  # DeploymentHandle of QwenrunReplica: Serve routes each call
        self.cfg = ServerConfig(**config)
        self.metrics = _IngressMetrics(self.cfg.model_name)
        self._health: tuple[float, list[dict[str, Any]]] = (0.0, [])

    async def running_replicas(self, max_age: float = 0.0) -> list[dict[str, Any]]:
        """The engine replicas Serve's controller reports RUNNING: id, pid, node."""
        t, reps = self._health
        if max_age and time.monotonic() - t < max_age:
            return reps
        from ray.serve.context import _get_global_client

        try:
            details = await asyncio.to_thread(_get_global_client().get_serve_details)
        except Exception as e:  # noqa: BLE001 - the controller is unreachable: nothing is known healthy
            log.warning("Serve's controller did not answer: %r", e)
            self._health = (time.monotonic(), [])
            return []
        app = details.get("applications", {}).get(self.cfg.ray.app_name, {})
        dep = app.get("deployments", {}).get("QwenrunReplica", {})
        reps = [{"id": r["replica_id"], "pid": r.get("pid"), "node_ip": r.get("node_ip")}
                for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]
        self._health = (time.monotonic(), reps)
        return reps

    async def _replica_metrics(self, rid: str) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.engine.metrics.remote(target=rid), 5.0)
        except Exception as e:  # noqa: BLE001 - a replica going away: left out of this scrape
            log.warning("metrics of replica %s: %r", rid, e)
            return None

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__: the ASGI app Serve's proxy sends requests to."""
        app = FastAPI(title="qwenrun", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(Guard, state=self)
        total = self.cfg.ray.replicas

        @app.exception_handler(APIError)
        async def _api_error(_: Request, e: APIError) -> Response:
            return JSONResponse(e.body(), e.status, headers=e.headers)

        @app.get("/health")
        async def health() -> Response:
            reps = await self.running_replicas()
            body = {"replicas_healthy": len(reps), "replicas_total": total, "replicas": reps}
            if not reps:
                return JSONResponse({**error_body(f"no engine replica is healthy (0 of {total})", "server_error",
                                                  None, "no_healthy_replica"), **body}, 503,
                                    headers={"Retry-After": "5"})
            return JSONResponse({"status": "ok", **body})

        @app.get("/metrics")
        async def metrics() -> Response:
            ids = [r["id"] for r in await self.running_replicas()]
            # One replica after another: concurrent calls made under one HTTP request share its
            # request id, and Ray Serve 2.60 then loses all but one response (measured).
            reps = [r for r in [await self._replica_metrics(i) for i in ids] if r is not None]
            return Response(self.metrics.render(reps, len(ids), total),
                            media_type="text/plain; version=0.0.4; charset=utf-8")

        if self.cfg.web_ui:
            add_web_ui(app)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
                       include_in_schema=False)
        async def forward(raw: Request) -> Response:
            if not await self.running_replicas(max_age=2.0) and not await self.running_replicas():
                raise APIError(503, f"no engine replica is healthy (0 of {total}); retry shortly",
                               code="no_healthy_replica", headers={"Retry-After": "5"})
            try:
                body = await raw.body()
            except ClientDisconnect:
                return Response(status_code=499)
            path = raw.url.path
            key = routing_key(path, body) if len(body) < 65536 else await asyncio.to_thread(routing_key, path, body)
            req = {"method": raw.method, "path": path, "query": raw.scope.get("query_string", b""),
                   "headers": list(raw.scope["headers"]), "body": body, "client": raw.scope.get("client")}
            gen = self.engine.options(stream=True).handle_http.remote(req, **{KEY_KW: key})
            try:
                status, headers = await gen.__anext__()
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - the replica died or failed before answering
                gen.cancel()
                raise _replica_error(e) from None
            sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

            async def rest():
                try:
                    async for chunk in gen:
                        yield chunk
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - after the status was sent: in-band, streams only
                    err = _replica_error(e)
                    log.warning("replica stream failed: %r", e)
                    if sse:
                        yield f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n".encode()
                finally:
                    gen.cancel()

            resp = StreamingResponse(rest(), status_code=status)
            resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
            return resp

        return app


def _replica_error(e: BaseException) -> APIError:
    import ray.exceptions as rex
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, BackPressureError):  # every replica full and --max-waiting queued at the front
        return APIError(503, f"the server is busy: {e}", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, (rex.RayActorError, rex.ActorUnavailableError)):
        return APIError(503, "the engine replica serving this request stopped; retry (Serve is replacing it)",
                        code="replica_unavailable", headers={"Retry-After": "1"})
    return APIError(503, f"the engine replica failed: {e!r}", code="replica_failed", headers={"Retry-After": "1"})


# -- building and running the application ---------------------------------------------------------
def _replica_cpus(cfg: ServerConfig) -> float:
    return cfg.ray.replica_cpus or float(cfg.engine.num_threads or 1)


def build_application(cfg: ServerConfig):
    """The Serve application for ``cfg``: ``serve.run(build_application(cfg))``."""
    cpus = _replica_cpus(cfg)
    engine_cfg = cfg.engine
    if engine_cfg.num_threads is None:  # one torch thread per reserved CPU (at least one)
        engine_cfg = replace(engine_cfg, num_threads=max(1, int(cpus)))
    config = ServerConfig(**{**cfg.to_dict(), "engine": engine_cfg}).to_dict()
    replica = serve.deployment(QwenrunReplica, name="QwenrunReplica").options(
        num_replicas=cfg.ray.replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": cfg.ray.replica_gpus},
        # The engine batches and queues itself (and answers 503 beyond --max-waiting): let Serve
        # send it that much, plus the ingress's per-replica metric calls.
        max_ongoing_requests=engine_cfg.max_num_seqs + cfg.max_waiting + 8,
        max_queued_requests=cfg.max_waiting,  # beyond that, waiting at the front: 503 queue_full
        request_router_config=RequestRouterConfig(
            request_router_class="qwenrun.server.ray_router:PrefixAffinityRouter",
            request_router_kwargs={"chunk_chars": 64, "min_match_chars": 256, "imbalance": 4}),
        health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(cfg.shutdown_grace, 0.1), graceful_shutdown_wait_loop_s=0.5,
        logging_config={"enable_access_log": False})  # the ingress logs each HTTP request once
    ingress = serve.deployment(serve.ingress()(QwenrunIngress), name="QwenrunIngress").options(
        num_replicas=1, ray_actor_options={"num_cpus": cfg.ray.ingress_cpus},
        max_ongoing_requests=100_000, graceful_shutdown_timeout_s=max(cfg.shutdown_grace, 0.1),
        graceful_shutdown_wait_loop_s=0.5)
    return ingress.bind(replica.bind(config), config)


def _coerce(value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if value.lower() in ("none", "null", ""):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def config_from_args(args: dict[str, Any]) -> ServerConfig:
    """A ServerConfig from Serve application args: nested (``engine: {...}``, ``ray: {...}``) as
    ServerConfig.to_dict writes them, or flat (``model=demo replicas=2`` from ``serve run``), each
    key an EngineConfig, RayConfig or ServerConfig field."""
    args = dict(args or {})
    eng_f = {f.name: f.default for f in fields(EngineConfig)}
    ray_f = {f.name: f.default for f in fields(RayConfig)}
    srv_f = {f.name: f.default for f in fields(ServerConfig)}
    engine, ray_kw, server = dict(args.pop("engine", {}) or {}), dict(args.pop("ray", {}) or {}), {}
    for k, v in args.items():
        if k in eng_f:
            engine[k] = _coerce(v, eng_f[k])
        elif k in ray_f:
            ray_kw[k] = _coerce(v, ray_f[k])
        elif k in srv_f:
            server[k] = _coerce(v, srv_f[k])
        else:
            raise ValueError(f"unknown qwenrun serve option {k!r}")
    return ServerConfig(engine=EngineConfig(**engine), ray=RayConfig(**ray_kw), **server)


def build_app(args: dict[str, Any]):
    """Serve application builder (``serve run qwenrun.server.ray_serve:build_app model=demo``)."""
    return build_application(config_from_args(args))


def serve_ray_main(cfg: ServerConfig) -> int:
    """``qwenrun serve --replicas N``: start (or join) Ray, run the application, wait for SIGTERM."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = cfg.ray.address in (None, "local")  # "local": a fresh local cluster even for --replicas 1
    init_kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if local:
        need = cfg.ray.replicas * _replica_cpus(cfg) + cfg.ray.ingress_cpus
        have = float(os.cpu_count() or 1)
        if need > have:
            print(f"qwenrun: {cfg.ray.replicas} replicas x {_replica_cpus(cfg):g} CPUs + the ingress need {need:g} "
                  f"CPUs; this machine has {have:g} (they will share cores)", file=sys.stderr)
        init_kw["num_cpus"] = math.ceil(max(have, need))  # Ray wants a whole number for a node
        init_kw["num_gpus"] = cfg.ray.replicas * cfg.ray.replica_gpus if cfg.ray.replica_gpus else None
    ray.init(address=None if local else cfg.ray.address, **init_kw)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        print(f"qwenrun: starting {cfg.ray.replicas} replica(s) of '{cfg.model_name}' on Ray Serve "
              f"({'local cluster' if local else cfg.ray.address}), http://{cfg.host}:{cfg.port}",
              file=sys.stderr, flush=True)
        serve.run(build_application(cfg), name=cfg.ray.app_name, route_prefix="/", blocking=False)
        print(f"qwenrun: serving '{cfg.model_name}' with {cfg.ray.replicas} replica(s) on "
              f"http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("qwenrun: stopping: draining the replicas", file=sys.stderr, flush=True)
    finally:
        try:
            # Our application first, while the HTTP proxy still runs: the ingress and the replicas
            # finish their requests (up to --shutdown-grace) and the proxy delivers the answers.
            # (serve.shutdown alone kills the proxies at once, cutting responses in flight.)
            serve.delete(cfg.ray.app_name)
            time.sleep(0.5)  # the last bytes leave the proxy
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
