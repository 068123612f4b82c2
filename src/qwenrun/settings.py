"""Typed configs of the front ends: the HTTP server (one process or Ray Serve replicas), the chat
REPL and the benches. The CLI parses flags and calls the ``from_args`` builders here (and
``EngineConfig.from_args``); everything below the CLI takes these objects, never an argparse
Namespace, and nothing imports back from ``cli.py``. Validation happens once, in ``__post_init__``,
as ValueError (the CLI prints it as one line and exits 2)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config import EngineConfig
from .sampling_params import SamplingParams

DEFAULT_MODEL = "Qwen/Qwen1.5-4B-Chat"


def _pick(cls: type, ns: Any, **override: Any) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``ns`` carries (same names), plus overrides."""
    kw = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    kw.update(override)
    return kw


def sampling_from_args(ns: Any) -> SamplingParams:
    """The CLI's sampling flags (generate, chat) as SamplingParams (validated there)."""
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, min_p=ns.min_p, repetition_penalty=ns.repetition_penalty,
                          seed=ns.sampling_seed, stop=ns.stop, ignore_eos=ns.ignore_eos)


@dataclass
class RayConfig:
    """``serve --replicas N``: N Ray Serve replicas, each a full engine with its own KV cache.

    ``replica_cpus`` is what Ray reserves per replica (fractions allowed, e.g. 0.5 to pack two
    replicas on one core in tests); None = the engine's thread count (or 1). ``replica_gpus`` is
    0 on CPU or 1 for one GPU each. ``address`` None starts a local Ray cluster for the server's
    lifetime (so does ``local``, which forces Ray even for one replica); an address (``auto``,
    ``ray://host:10001``, ``host:6379``) joins an existing one."""

    replicas: int = 1
    address: str | None = None
    replica_cpus: float | None = None
    replica_gpus: float = 0.0
    ingress_cpus: float = 0.25  # the HTTP front (auth, parsing, routing key); it runs no model
    app_name: str = "qwenrun"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.replica_cpus is not None and self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.replica_gpus < 0:
            raise ValueError(f"--replica-gpus must be >= 0, got {self.replica_gpus}")
        if self.ingress_cpus < 0:
            raise ValueError(f"ingress_cpus must be >= 0, got {self.ingress_cpus}")


@dataclass
class ServerConfig:
    """``qwenrun serve``: what the HTTP server needs besides the engine."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 256
    max_body_bytes: int = 8 << 20
    shutdown_grace: float = 10.0
    chat_template: str | None = None  # a FILE path (--chat-template); read at start
    web_ui: bool = True
    # cost caps per request (server/limits.py RequestLimits)
    max_n: int = 128
    max_logit_bias: int = 300
    max_stop: int = 32
    max_stop_length: int = 1024
    max_logprobs: int = 20
    max_echo_logprob_tokens: int = 32768
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if isinstance(self.ray, dict):
            self.ray = RayConfig(**self.ray)
        if self.max_body_bytes < 1 or self.max_waiting < 1 or self.shutdown_grace < 0:
            raise ValueError("--max-body-bytes and --max-waiting must be >= 1, --shutdown-grace >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        self.request_limits()  # validates the caps now, not at the first request

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model

    def request_limits(self):
        from .server.limits import RequestLimits

        return RequestLimits(max_n=self.max_n, max_logit_bias=self.max_logit_bias, max_stop=self.max_stop,
                             max_stop_length=self.max_stop_length, max_logprobs=self.max_logprobs,
                             max_echo_logprob_tokens=self.max_echo_logprob_tokens)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (Ray Serve's application args, a YAML config): ``ServerConfig(**d)`` rebuilds it."""
        return asdict(self)

    @classmethod
    def from_args(cls, ns: Any) -> "ServerConfig":
        ray = RayConfig(replicas=getattr(ns, "replicas", 1), address=getattr(ns, "ray_address", None),
                        replica_cpus=getattr(ns, "replica_cpus", None),
                        replica_gpus=getattr(ns, "replica_gpus", 0.0) or 0.0)
        return cls(**_pick(cls, ns, engine=EngineConfig.from_args(ns), ray=ray,
                           web_ui=not getattr(ns, "no_web_ui", False)))


@dataclass
class ChatConfig:
    """``qwenrun chat``: a local engine, or ``url`` of a running server."""

    engine: EngineConfig
    sampling: SamplingParams
    url: str | None = None
    api_key: str | None = None
    system: str | None = None

    @property
    def remote_model(self) -> str | None:
        """The model to ask a server for: None (the server's) unless one was named."""
        return None if self.engine.model == DEFAULT_MODEL else self.engine.model

    @classmethod
    def from_args(cls, ns: Any) -> "ChatConfig":
        sampling = sampling_from_args(ns)  # validated before anything loads
        return cls(engine=EngineConfig.from_args(ns), sampling=sampling, url=ns.url, api_key=ns.api_key,
                   system=ns.system)


@dataclass
class BenchConfig:
    """``qwenrun bench latency|throughput``: engine benchmarks."""

    engine: EngineConfig
    kind: str = "latency"
    input_len: int = 512
    output_len: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    repeats: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("latency", "throughput"):
            raise ValueError(f"bench kind must be latency or throughput, got {self.kind!r}")
        if isinstance(self.batch_sizes, str):
            try:
                self.batch_sizes = [int(x) for x in self.batch_sizes.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--batch-sizes must be comma-separated integers, got {self.batch_sizes!r}") from None
        if self.input_len < 1 or self.output_len < 1 or any(b < 1 for b in self.batch_sizes):
            raise ValueError("--input-len, --output-len and --batch-sizes values must be >= 1")

    @classmethod
    def from_args(cls, ns: Any) -> "BenchConfig":
        return cls(engine=EngineConfig.from_args(ns), kind=ns.bench_kind, input_len=ns.input_len,
                   output_len=ns.output_len, batch_sizes=ns.batch_sizes, repeats=ns.repeats, warmup=ns.warmup)


@dataclass
class ServeBenchConfig:
    """``qwenrun bench serve``: an HTTP client benchmark against a running server."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    api_key: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    num_requests: int | None = None
    input_len: int = 128
    output_len: int = 64
    label: str = "qwenrun"

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, str):
            from .server.bench import parse_concurrency

            self.concurrency = parse_concurrency(self.concurrency)
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be >= 1")

    @classmethod
    def from_args(cls, ns: Any) -> "ServeBenchConfig":
        return cls(**_pick(cls, ns))
