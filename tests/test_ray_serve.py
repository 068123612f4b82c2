"""``qwenrun serve --replicas 2`` on Ray Serve, black-box: the real CLI starts a local Ray cluster
(two engine replicas of the tiny model at half a CPU each, plus the ingress) on a loopback port;
the tests drive it with httpx and the official openai client, kill replica processes, and finally
SIGTERM it and check that no process it started (Ray's included) outlives it.

One server for the module (starting Ray costs tens of seconds on a busy 2-core machine); the tests
run in file order and the last one stops it."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server import ServerProcess, sse_events, tiny_ckpt  # noqa: F401 - tiny_ckpt is a fixture

KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER = "x-qwenrun-replica"


@pytest.fixture(scope="module")
def ray_srv(tiny_ckpt, tmp_path_factory):  # noqa: F811
    args = [str(tiny_ckpt), "--served-model-name", "tiny", "--max-model-len", "2048", "--kv-cache-memory", "0.125",
            "--block-size", "16", "--max-num-seqs", "32", "--threads", "1", "--api-key", KEY,
            "--max-body-bytes", "65536", "--replicas", "2", "--replica-cpus", "0.5", "--shutdown-grace", "20"]
    srv = ServerProcess(args, tmp_path_factory.mktemp("ray") / "serve.log", env={"RAY_DEDUP_LOGS": "0"})
    try:
        srv.wait_ready(300)
        wait_healthy(srv, 2, 120)
        yield srv
    finally:
        srv.stop()


def health(srv: ServerProcess) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/health", timeout=10)
    return r.status_code, r.json()


def wait_healthy(srv: ServerProcess, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = health(srv)
        if code == 200 and body["replicas_healthy"] == n:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"not {n} healthy replicas after {timeout}s: {code} {body}\n{srv.log()}")
        time.sleep(0.5)


def replica_metrics(srv: ServerProcess) -> dict[str, dict[str, float]]:
    """replica id -> {sample name: value} (model_name dropped), from the aggregated /metrics."""
    out: dict[str, dict[str, float]] = {}
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            rep = s.labels.get("replica")
            if rep is not None:
                rest = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("replica", "model_name"))
                out.setdefault(rep, {})[f"{s.name}{{{rest}}}" if rest else s.name] = s.value
    return out


def wait_idle(srv: ServerProcess, timeout: float = 30) -> dict[str, dict[str, float]]:
    """Metrics once no replica runs or queues a request and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        m = replica_metrics(srv)
        if m and all(r["qwenrun:num_requests_running"] == 0 and r["qwenrun:num_requests_waiting"] == 0
                     and r["qwenrun:kv_cache_usage_perc"] == 0 for r in m.values()):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas not idle after {timeout}s: {m}")
        time.sleep(0.2)


def post(srv: ServerProcess, path: str, body: dict, timeout: float = 120, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=AUTH, timeout=timeout, **kw)


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    return err


# -- in-process: the routing key, the router's prefix memory, the Serve config --------------------
def test_routing_key_follows_the_prompt_prefix():
    from qwenrun.server.ray_serve import routing_key

    def chat(*msgs, **kw):
        return json.dumps({"model": "m", "messages": [{"role": r, "content": c} for r, c in msgs], **kw}).encode()

    sys_ = ("system", "S" * 500)
    first = routing_key("/v1/chat/completions", chat(sys_, ("user", "hi")))
    cont = routing_key("/v1/chat/completions", chat(sys_, ("user", "hi"), ("assistant", "yo"), ("user", "more")))
    other = routing_key("/v1/chat/completions", chat(("system", "T" * 500), ("user", "hi")))
    assert cont.startswith(first) and not other.startswith(first[:100])  # a conversation extends its key
    # parts are read as the template reads them; tools come first (they go into the system prompt)
    parts = chat(("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]))
    assert routing_key("/v1/chat/completions", parts).endswith("ab")
    tooled = routing_key("/v1/chat/completions", chat(sys_, tools=[{"type": "function", "function": {"name": "f"}}]))
    assert tooled.index('"f"') < tooled.index("SSS")
    assert routing_key("/v1/completions", b'{"prompt": "hello"}') == "hello"
    assert routing_key("/v1/completions", b'{"prompt": [[1, 2]]}') == "[1, 2]"
    for bad in (b"{not json", b"[1]", b""):
        assert routing_key("/v1/chat/completions", bad) == ""
    assert routing_key("/tokenize", b'{"prompt": "x"}') == ""
    assert len(routing_key("/v1/completions", json.dumps({"prompt": "x" * 100000}).encode())) == 32768


def test_router_prefix_memory_prefers_the_longest_live_match():
    from qwenrun.server.ray_router import PrefixAffinityRouter, chunk_hashes

    assert chunk_hashes("a" * 63, 64) == [] and len(chunk_hashes("a" * 200, 64)) == 3
    assert chunk_hashes("x" * 64 + "y" * 64, 64)[0] == chunk_hashes("x" * 64 + "z" * 64, 64)[0]
    r = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the ranking state alone, no Serve handle
    r.initialize_state(chunk_chars=64, min_match_chars=128, imbalance=4)
    a, b = "A", "B"
    shared = "s" * 256
    for h in chunk_hashes(shared + "1" * 128, 64):
        r._owner[h] = a
    for h in chunk_hashes(shared, 64):  # b served the bare prefix later: it owns the first 4 chunks
        r._owner[h] = b
    live = {a: object(), b: object()}
    assert r._match(chunk_hashes(shared + "1" * 128 + "tail", 64), live) == (a, 6)
    assert r._match(chunk_hashes(shared + "2" * 128, 64), live) == (b, 4)
    assert r._match(chunk_hashes(shared + "1" * 128, 64), {b: object()}) == (b, 4)  # a is gone
    assert r._match(chunk_hashes("t" * 300, 64), live) == (None, 0)
    assert r._match(chunk_hashes("s" * 64 + "q" * 64, 64), live) == (None, 0)  # 1 chunk < min_match


def test_serve_config_yaml_and_flat_args_build_server_configs():
    import yaml

    from qwenrun.server.ray_serve import config_from_args

    doc = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "ray-serve.yaml").read_text())
    cfg = config_from_args(doc["applications"][0]["args"])
    assert cfg.engine.quantization == "int8" and cfg.ray.replicas == 4 and cfg.ray.replica_cpus == 4
    assert cfg.api_key == "sk-change-me" and doc["applications"][0]["name"] == cfg.ray.app_name
    flat = config_from_args({"model": "demo", "replicas": "2", "replica_cpus": "0.5", "num_threads": "1",
                             "web_ui": "false"})  # as `serve run ... key=value` passes them: strings
    assert (flat.engine.model, flat.ray.replicas, flat.ray.replica_cpus, flat.engine.num_threads, flat.web_ui) == (
        "demo", 2, 0.5, 1, False)
    with pytest.raises(ValueError, match="unknown qwenrun serve option"):
        config_from_args({"modle": "demo"})
    with pytest.raises(ValueError, match="--replicas"):
        config_from_args({"replicas": "0"})
    assert flat.to_dict()["engine"]["model"] == "demo" and type(flat)(**flat.to_dict()) == flat


def test_cli_flags_and_env_reach_the_typed_config(monkeypatch):
    from qwenrun.cli import build_parser
    from qwenrun.settings import ServerConfig

    monkeypatch.setenv("QWENRUN_REPLICAS", "3")
    monkeypatch.setenv("QWENRUN_RAY_ADDRESS", "ray://head:10001")
    cfg = ServerConfig.from_args(build_parser().parse_args(
        ["serve", "demo", "--replica-cpus", "2", "--replica-gpus", "1", "--threads", "2", "--no-prefix-caching"]))
    assert (cfg.ray.replicas, cfg.ray.address, cfg.ray.replica_cpus, cfg.ray.replica_gpus) == (3, "ray://head:10001", 2, 1)
    assert cfg.engine.num_threads == 2 and cfg.engine.enable_prefix_caching is False
    monkeypatch.delenv("QWENRUN_REPLICAS")
    monkeypatch.delenv("QWENRUN_RAY_ADDRESS")
    one = ServerConfig.from_args(build_parser().parse_args(["serve", "demo"]))
    assert one.ray.replicas == 1 and one.ray.address is None
    # --replicas 1 is today's single-process server: Ray is never imported
    code = ("import sys; import qwenrun.server.app as app; seen = []; app.serve_main = seen.append; "
            "from qwenrun.cli import main; main(['serve', 'demo']); "
            "assert type(seen[0]).__name__ == 'ServerConfig', seen; assert 'ray' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


# -- the API, unchanged ---------------------------------------------------------------------------
def test_both_replicas_serve_under_concurrent_load(ray_srv):
    body = wait_healthy(ray_srv, 2, 10)
    ids = {r["id"] for r in body["replicas"]}
    assert body["replicas_total"] == 2 and len(ids) == 2

    def one(i: int) -> httpx.Response:
        return post(ray_srv, "/v1/completions", {"model": "tiny", "prompt": f"{i} request number {i}",
                                                 "max_tokens": 24, "ignore_eos": True, "temperature": 0})

    with cf.ThreadPoolExecutor(16) as ex:
        rs = list(ex.map(one, range(16)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in rs)
    served = [r.headers[HEADER] for r in rs]
    assert set(served) == ids, served  # both replicas took part, and nothing else answered
    m = wait_idle(ray_srv)
    assert set(m) == ids
    # every replica's own engine counted its share of the requests (the label is true)
    for rid in ids:
        assert m[rid]["qwenrun:request_success_total{finished_reason=length}"] >= served.count(rid)


def test_shared_long_prefix_stays_on_one_replica_and_hits_its_prefix_cache(ray_srv):
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer item {i} briefly." for i in range(40))
    assert len(system) > 1000
    before = replica_metrics(ray_srv)
    served, cached = [], []
    for i in range(8):
        r = post(ray_srv, "/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": f"question {i}?"}]})
        assert r.status_code == 200, r.text
        served.append(r.headers[HEADER])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    # Without affinity, least-loaded choice between two idle replicas is a coin flip: 8 in a row on
    # one replica would be a 1-in-128 accident.
    assert len(set(served)) == 1, served
    rid = served[0]
    after = replica_metrics(ray_srv)
    hits = after[rid]["qwenrun:prefix_cache_hits_total"] - before.get(rid, {}).get("qwenrun:prefix_cache_hits_total", 0)
    assert all(c > 0 for c in cached[1:]), cached  # every later request reused the system prompt's blocks
    assert hits >= sum(cached[1:]) > 7 * 100, (hits, cached)


def test_stream_equals_non_stream_and_the_openai_client_works_unchanged(ray_srv):
    import openai

    client = openai.OpenAI(base_url=ray_srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "Tell me about foxes."}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=32, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert full.choices[0].message.content == streamed and len(streamed) > 0
    comp = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, temperature=0)
    comp_s = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=16, temperature=0, stream=True))
    assert comp.choices[0].text == comp_s
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=2)
    assert raw.headers[HEADER]
    # tokenizer routes pass through too
    tok = post(ray_srv, "/tokenize", {"prompt": "hello"})
    assert tok.status_code == 200 and tok.json()["tokens"]
    # the client's own errors come back OpenAI-shaped with the right status
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=msgs, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=ray_srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_input_is_openai_shaped_through_the_ingress(ray_srv):
    assert openai_error(httpx.post(ray_srv.url + "/v1/completions", json={"prompt": "x"}, timeout=30),
                        401)["code"] == "invalid_api_key"
    r = httpx.post(ray_srv.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert "not valid JSON" in openai_error(r, 400)["message"]
    assert openai_error(post(ray_srv, "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400)["param"]
    assert openai_error(post(ray_srv, "/v1/completions", {"prompt": "x" * 70000}), 413)["code"] == "request_too_large"
    assert openai_error(httpx.get(ray_srv.url + "/v1/nothing", headers=AUTH, timeout=30), 404)["code"] == "not_found"
    r = post(ray_srv, "/v1/completions", {"model": "tiny", "prompt": [1] * 3000, "max_tokens": 4})
    assert openai_error(r, 400)["code"] == "context_length_exceeded"


def test_metrics_aggregate_the_replicas_with_a_replica_label(ray_srv):
    body = wait_healthy(ray_srv, 2, 10)
    text = httpx.get(ray_srv.url + "/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["qwenrun:replicas_healthy"].samples[0].value == 2
    assert fams["qwenrun:replicas_total"].samples[0].value == 2
    per = {s.labels["replica"] for s in fams["qwenrun:kv_cache_usage_perc"].samples}
    assert per == {r["id"] for r in body["replicas"]}
    assert {s.labels["replica"] for s in fams["qwenrun:time_to_first_token_seconds"].samples} == per
    # HTTP statuses are counted once, at the front (the 401/413 of the test above among them)
    statuses = {s.labels["status"]: s.value for s in fams["qwenrun:http_requests"].samples}
    assert statuses["200"] > 0 and statuses["401"] >= 1 and statuses["413"] >= 1


def test_client_disconnect_aborts_on_the_replica(ray_srv):
    wait_idle(ray_srv)
    long = {"model": "tiny", "prompt": "a long answer", "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", ray_srv.url + "/v1/completions", json={**long, "stream": True}, headers=AUTH) as r:
            assert r.status_code == 200
            rid = r.headers[HEADER]
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # the stream is closed: the engine request must be gone and its blocks freed
    m = wait_idle(ray_srv, 20)
    assert m[rid]["qwenrun:request_success_total{finished_reason=abort}"] >= 1
    # a non-streamed request whose client gives up is aborted too. It must still be running when the
    # client leaves on any CPU: 32 samples of 2,000 tokens (8 s here for 16; one of 1,500 tokens finished
    # in 1.5 s here and sooner on a fast CI machine).
    aborts = sum(r.get("qwenrun:request_success_total{finished_reason=abort}", 0) for r in m.values())
    t0 = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        post(ray_srv, "/v1/completions", {**long, "max_tokens": 2000, "n": 32}, timeout=1.0)
    assert time.monotonic() - t0 < 10
    m = wait_idle(ray_srv, 20)
    assert sum(r.get("qwenrun:request_success_total{finished_reason=abort}", 0) for r in m.values()) >= aborts + 1


# -- faults ---------------------------------------------------------------------------------------
def test_killed_replica_fails_its_requests_cleanly_and_serve_replaces_it(ray_srv):
    body = wait_healthy(ray_srv, 2, 60)
    pids = {r["id"]: r["pid"] for r in body["replicas"]}
    # the victim must outlive the 0.5 s below on any CPU: 4 samples of 2,000 tokens
    long = {"model": "tiny", "prompt": "p", "max_tokens": 2000, "n": 4, "ignore_eos": True}
    with httpx.Client(timeout=120) as c, cf.ThreadPoolExecutor(8) as ex:
        with c.stream("POST", ray_srv.url + "/v1/completions", json={**long, "stream": True}, headers=AUTH) as s:
            victim = s.headers[HEADER]
            lines = s.iter_lines()
            next(lines)
            # load beside it: short requests on both replicas while the victim dies
            load = [ex.submit(post, ray_srv, "/v1/completions", {"model": "tiny", "prompt": f"{i} load {i}",
                                                                 "max_tokens": 16, "ignore_eos": True})
                    for i in range(12)]
            time.sleep(0.5)
            os.kill(pids[victim], signal.SIGKILL)
            events = [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]"
                      for x in lines if x.startswith("data: ")]
        # the stream ended with an OpenAI-shaped error event, then [DONE]
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert events[-2]["error"]["code"] == "replica_unavailable"
        results = [f.result() for f in load]
    for r in results:  # each either succeeded or got a clean 503 (it was on the dead replica)
        if r.status_code != 200:
            assert openai_error(r, 503)["code"] in ("replica_unavailable", "replica_failed")
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    assert any(r.status_code == 200 for r in results)
    # Serve notices the death; later requests go to the healthy replica
    deadline = time.monotonic() + 30
    while victim in {r["id"] for r in health(ray_srv)[1]["replicas"]}:
        assert time.monotonic() < deadline, "the dead replica is still reported running"
        time.sleep(0.2)
    later = [post(ray_srv, "/v1/completions", {"model": "tiny", "prompt": f"after {i}", "max_tokens": 8})
             for i in range(6)]
    assert all(r.status_code == 200 for r in later), [r.text for r in later]
    assert victim not in {r.headers[HEADER] for r in later}
    # ... and Serve starts a replacement
    body = wait_healthy(ray_srv, 2, 180)
    assert victim not in {r["id"] for r in body["replicas"]}

    # With every replica dead at once, /health says so (503) until Serve has replaced them.
    for r in body["replicas"]:
        os.kill(r["pid"], signal.SIGKILL)
    deadline, seen = time.monotonic() + 30, None
    while seen is None and time.monotonic() < deadline:
        code, h = health(ray_srv)
        if code == 503:
            seen = h
        time.sleep(0.1)
    assert seen is not None and seen["replicas_healthy"] == 0 and seen["replicas_total"] == 2
    assert seen["error"]["code"] == "no_healthy_replica"
    wait_healthy(ray_srv, 2, 180)
    assert post(ray_srv, "/v1/completions", {"model": "tiny", "prompt": "back", "max_tokens": 4}).status_code == 200


def test_sigterm_drains_and_exits_0_leaving_no_ray_process(ray_srv):
    proc = psutil.Process(ray_srv.proc.pid)
    started = proc.children(recursive=True)
    names = " ".join(p.name() for p in started)
    assert "raylet" in names and "gcs_server" in names, names  # the local cluster is the server's own
    with cf.ThreadPoolExecutor(1) as ex:
        def timed() -> tuple[httpx.Response, float]:
            r = post(ray_srv, "/v1/completions", {"model": "tiny", "prompt": "drain me", "max_tokens": 2000,
                                                  "n": 4, "ignore_eos": True})
            return r, time.monotonic()

        # SIGTERM as soon as the request runs on a replica (a fixed sleep raced a fast CPU)
        inflight = ex.submit(timed)
        deadline = time.monotonic() + 30
        while not any(r["qwenrun:num_requests_running"] for r in replica_metrics(ray_srv).values()):
            assert time.monotonic() < deadline and not inflight.done(), "the request never ran"
            time.sleep(0.05)
        t_term = time.monotonic()
        ray_srv.proc.send_signal(signal.SIGTERM)
        rc = ray_srv.proc.wait(120)
        r, t_done = inflight.result()
    assert rc == 0, ray_srv.log()
    # it was still running when SIGTERM came, and was let finish (drained, not cut)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8000, r.text
    assert t_done > t_term
    _, alive = psutil.wait_procs(started, timeout=20)
    assert not alive, [(p.pid, p.name()) for p in alive]
