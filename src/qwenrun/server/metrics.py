"""Prometheus metrics for /metrics, named like vLLM's (``vllm:x`` → ``qwenrun:x``).

Everything lives in one CollectorRegistry owned by the server (never the global default
registry: two servers in one process, or tests, must not share counters). Engine state (queue
lengths, KV usage, prefix cache, token totals) is read at scrape time by a collector, so it is
always current and costs nothing per step; per-request latencies are observed by the serving
layer when a request ends."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..outputs import RequestOutput

# Buckets tuned for CPU and GPU alike: sub-10 ms decode steps up to minute-long CPU requests.
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0)
_TOKEN = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    """Reads the engine when scraped. ``get_llm`` returns None while the model loads."""

    def __init__(self, get_llm: Callable[[], Any], model_name: str) -> None:
        self._get_llm = get_llm
        self._name = model_name

    def collect(self) -> Iterator[Metric]:
        llm = self._get_llm()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"qwenrun:{name}", doc, labels=labels)
            g.add_metric([self._name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"qwenrun:{name}", doc, labels=labels)
            c.add_metric([self._name], value)
            return c

        yield gauge("model_loaded", "1 once the model is loaded and requests are served.", int(llm is not None))
        if llm is None:
            return
        eng = llm.engine
        # Plain reads of ints/lists owned by the engine thread: a scrape may be one step stale,
        # never inconsistent enough to matter for a gauge.
        yield gauge("engine_healthy", "1 while the engine thread runs; 0 once it has stopped.", int(llm.healthy))
        yield counter("requests_failed", "Requests failed inside the engine (a failed step or post-processing).",
                      eng.stats["failed"])
        yield gauge("num_requests_running", "Sequences in the running batch.", eng.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", eng.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", eng.kv_usage)
        bm = eng.block_manager
        yield gauge("kv_cache_used_blocks", "KV cache blocks held by live sequences.", bm.num_blocks - bm.num_free_blocks)
        yield gauge("max_num_running_seen", "Most sequences running at once since start (batching).",
                    llm.max_running_seen)
        yield gauge("max_batch_seqs_seen", "Most sequences in one model forward since start.",
                    eng.runner.max_batch_seqs)
        yield counter("engine_steps", "Engine steps (one model forward each).", llm.step_count)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", bm.prefix_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", bm.prefix_hits)
        yield counter("prompt_tokens", "Prompt tokens admitted.", eng.stats["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", eng.stats["generation_tokens"])
        if getattr(eng, "spec", None) is not None:
            from ..engine.spec_decode import spec_metrics

            sm = spec_metrics(eng.scheduler)
            yield counter("spec_decode_num_drafts", "Speculative verifications (one sequence's proposals each).",
                          sm["num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Proposed tokens verified.", sm["num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.", sm["num_accepted_tokens"])
            yield gauge("spec_decode_acceptance_rate", "Accepted / proposed tokens since start.", sm["acceptance_rate"])
            yield gauge("spec_decode_mean_acceptance_length",
                        "Tokens emitted per verification (accepted proposals + 1) since start.",
                        sm["mean_acceptance_length"])


class ServerMetrics:
    """The server's registry plus the per-request observations."""

    def __init__(self, model_name: str, get_llm: Callable[[], Any]) -> None:
        disable_created_metrics()  # the *_created series only double the output; vLLM omits them too
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.request_success = Counter("qwenrun:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.http_requests = Counter("qwenrun:http_requests", "HTTP responses by status code.",
                                     ["status"], registry=r)
        self.ttft = Histogram("qwenrun:time_to_first_token_seconds", "Arrival to first token.",
                              labels, buckets=_LATENCY, registry=r)
        self.itl = Histogram("qwenrun:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=_TOKEN, registry=r)
        self.tpot = Histogram("qwenrun:time_per_output_token_seconds",
                              "Per request: (last token - first token) / (tokens - 1).", labels,
                              buckets=_TOKEN, registry=r)
        self.e2e = Histogram("qwenrun:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("qwenrun:request_queue_time_seconds", "Arrival to first scheduled.", labels,
                               buckets=_LATENCY, registry=r)
        self.prefill = Histogram("qwenrun:request_prefill_time_seconds", "First scheduled to first token.",
                                 labels, buckets=_LATENCY, registry=r)
        self.registry.register(_EngineCollector(get_llm, model_name))

    def observe_itl(self, seconds: float, num_tokens: int) -> None:
        """One observation per token of an output delta (a step can add several when batched n>1)."""
        if num_tokens > 0:
            per = seconds / num_tokens
            h = self.itl.labels(self.model_name)
            for _ in range(num_tokens):
                h.observe(per)

    def observe_finished(self, out: RequestOutput, reason: str, num_tokens: int) -> None:
        """Latency histograms and the success counter, once per engine request (``num_tokens``:
        the longest sample's generated tokens)."""
        name = self.model_name
        self.request_success.labels(name, reason).inc()
        m = out.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - m.arrival_time))
            n = num_tokens
            if n > 1 and m.last_token_time is not None:
                self.tpot.labels(name).observe((m.last_token_time - m.first_token_time) / (n - 1))
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            if m.first_token_time is not None:
                self.prefill.labels(name).observe(max(0.0, m.first_token_time - m.first_scheduled_time))
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.labels(name).observe(max(0.0, end - m.arrival_time))

    def count_http(self, status: int) -> None:
        self.http_requests.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
