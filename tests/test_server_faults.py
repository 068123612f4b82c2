"""The server under faults, load and hostile input, black-box on a real ``qwenrun serve``:
a disconnect storm on the demo model, injected step failures, a dead engine, a reader that stops
reading, a multi-megabyte prompt next to health probes, bad bodies, and a schemathesis run
against the server's own /openapi.json."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server import ServerProcess, serving, tiny_ckpt, tiny_server_args  # noqa: F401 - tiny_ckpt is a fixture


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def plain(tiny_ckpt, tmp_path_factory):  # noqa: F811 - default limits (8 MiB bodies), no API key
    with serving(tiny_server_args(tiny_ckpt) + ["--max-model-len", "4096", "--kv-cache-memory", "0.5"],
                 tmp_path_factory.mktemp("log") / "plain.log", 120) as srv:
        yield srv


def _post(srv: ServerProcess, path: str, body=None, *, raw: bytes | None = None, timeout: float = 60) -> httpx.Response:
    if raw is None:
        raw = json.dumps(body).encode()
    return httpx.post(srv.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=timeout)


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


# -- hostile input (issue 10, item 6): each a 4xx with an OpenAI-shaped error -----------------------
def test_deeply_nested_json_is_400(plain):
    raw = b'{"model": "tiny", "messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    _assert_openai_error(_post(plain, "/v1/chat/completions", raw=raw), 400)
    deep = {"role": "user", "content": [{"type": "text", "text": "x", "extra": json.loads("[" * 900 + "]" * 900)}]}
    r = _post(plain, "/v1/chat/completions", _chat(messages=[deep]))
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "function": {"arguments": "{}"}}]},
    {"role": "assistant", "content": None, "tool_calls": "oops"},
    {"role": "assistant", "content": None, "function_call": {"name": "f"}},
    {"role": "assistant", "content": "", "function_call": {"arguments": "{}"}},
])
def test_partial_tool_calls_in_history_are_400(plain, message):
    body = _chat(messages=[{"role": "user", "content": "Hi"}, message, {"role": "user", "content": "Go on"}])
    _assert_openai_error(_post(plain, "/v1/chat/completions", body), 400, param="messages")


@pytest.mark.parametrize("tools", [
    [{"type": "function"}],
    [{"type": "function", "function": {"description": "no name"}}],
    [{"type": "retrieval"}],
    [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}],
    ["get_weather"],
])
def test_malformed_tools_are_400(plain, tools):
    _assert_openai_error(_post(plain, "/v1/chat/completions", _chat(tools=tools)), 400, param="tools")


@pytest.mark.parametrize("rf", [{"type": "json_schema", "json_schema": {"name": "x"}},
                                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
                                {"type": "yaml"}, {}])
def test_response_format_unknown_or_malformed_is_400_never_ignored(plain, rf):
    _assert_openai_error(_post(plain, "/v1/chat/completions", _chat(response_format=rf)), 400, param="response_format")
    ok = _post(plain, "/v1/chat/completions", _chat(response_format={"type": "text"}))
    assert ok.status_code == 200, ok.text


def test_response_format_json_is_served_constrained(plain):
    # structured output (issue 11): the tiny model's noise, constrained, is a valid object
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    r = _post(plain, "/v1/chat/completions", _chat(response_format=rf, max_tokens=40, temperature=0))
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in ({"ok": True}, {"ok": False})
    r = _post(plain, "/v1/chat/completions", _chat(response_format={"type": "json_object"}, max_tokens=4))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("{")


@pytest.mark.parametrize("raw", [b'[{"role": "user", "content": "Hi"}]', b'"a string"', b"null", b"12"])
def test_body_that_is_not_an_object_is_400(plain, raw):
    _assert_openai_error(_post(plain, "/v1/chat/completions", raw=raw), 400)


def test_nul_bytes_in_content_are_served(plain):
    r = _post(plain, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a\u0000b\u0000"}]))
    assert r.status_code == 200, r.text
    r = _post(plain, "/v1/completions", {"prompt": "x\u0000y", "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,field", [("/v1/chat/completions", "content"), ("/v1/completions", "prompt"),
                                        ("/tokenize", "prompt")])
def test_lone_surrogates_are_400(plain, path, field):
    body = (_chat(messages=[{"role": "user", "content": "REPL"}]) if field == "content"
            else {"prompt": "REPL", "max_tokens": 2})
    raw = json.dumps(body).replace("REPL", "a\\ud800b").encode()
    err = _assert_openai_error(_post(plain, path, raw=raw), 400)
    assert "surrogate" in err["message"]
    paired = json.dumps(body).replace("REPL", "\\ud83d\\ude00").encode()  # a real pair: an emoji
    assert _post(plain, path, raw=paired).status_code == 200


# -- cost caps (item 4) ---------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,param,flag", [
    ("/v1/chat/completions", _chat(n=129), "n", "--max-n"),
    ("/v1/chat/completions", _chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "--max-logit-bias"),
    ("/v1/chat/completions", _chat(stop=[f"s{i}" for i in range(33)]), "stop", "--max-stop"),
    ("/v1/chat/completions", _chat(stop=["x" * 1025]), "stop", "--max-stop-length"),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), "top_logprobs", "--max-logprobs"),
    ("/v1/completions", {"prompt": [5] * 300, "n": 128, "echo": True, "logprobs": 1, "max_tokens": 1}, "logprobs",
     "--max-echo-logprob-tokens"),
])
def test_cost_caps_are_400s_naming_the_flag(plain, path, body, param, flag):
    err = _assert_openai_error(_post(plain, path, body), 400, param=param)
    assert flag in err["message"] and err["code"] == "limit_exceeded"


def test_echo_logprobs_with_many_samples_costs_one_prompt_pass(plain):
    # 64 samples of a 200-token prompt with echo + logprobs: prompt logprobs computed once
    t = time.perf_counter()
    r = _post(plain, "/v1/completions", {"prompt": [5 + i % 50 for i in range(200)], "n": 64, "echo": True,
                                         "logprobs": 2, "max_tokens": 2, "temperature": 0.7, "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 64
    first = choices[0]["logprobs"]["token_logprobs"][:200]
    assert first[0] is None and all(c["logprobs"]["token_logprobs"][:200] == first for c in choices)
    assert time.perf_counter() - t < 60


# -- the event loop never blocks (item 5) --------------------------------------------------------
def test_health_answers_while_a_huge_prompt_is_tokenized(plain):
    text = "Hello world! The quick brown fox jumps over the lazy dog. " * 60000  # 3.5 MB
    result = {}

    def big():
        result["r"] = _post(plain, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": text}]),
                            timeout=120)

    th = threading.Thread(target=big)
    th.start()
    time.sleep(0.3)
    lat = []
    while th.is_alive():
        t = time.perf_counter()
        assert httpx.get(plain.url + "/health", timeout=30).status_code == 200
        lat.append(time.perf_counter() - t)
        time.sleep(0.05)
    th.join()
    err = _assert_openai_error(result["r"], 400)  # far beyond the context: refused, after tokenizing it
    assert err["code"] == "context_length_exceeded"
    # tokenizing 3.5 MB takes seconds here; on the event loop it would hold every probe that long
    assert max(lat) < 1.0, f"/health took up to {max(lat):.2f}s while the prompt was processed ({len(lat)} probes)"
    assert len(lat) >= 3


# -- OpenAI semantics and the schema (items 7, 8) ------------------------------------------------
def test_openapi_schema_describes_the_request_bodies(plain):
    spec = httpx.get(plain.url + "/openapi.json", timeout=10).json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "temperature", "tools", "response_format", "stream"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    assert "CompletionRequest" in spec["components"]["schemas"] and "/v1/completions" in spec["paths"]


def test_schemathesis_finds_no_server_errors(plain, tmp_path):
    """A bounded fuzzing run from the server's own schema: no 5xx, no hang, no dropped connection."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert exe, "schemathesis is a dev dependency"
    cmd = [exe, "run", plain.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
           "--request-timeout", "60", "--seed", "1", "--workers", "1", "--suppress-health-check", "all",
           "--report", "junit", "--report-dir", str(tmp_path)]
    # One worker: with two, schemathesis 4.32's case generation races on a Hypothesis cache shared
    # between threads (KeyError in AST_LAMBDAS_CACHE -> FlakyFailure reported as an "error" before any
    # request is sent), about one run in three here. The server's concurrency is tested elsewhere.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache stays there
    print(r.stdout, r.stderr, sep="\n")  # shown in full under "Captured stdout" when this fails
    assert r.returncode == 0, "schemathesis failed: its report is in the captured stdout above"
    assert "Server error" not in r.stdout
    assert httpx.get(plain.url + "/health", timeout=10).status_code == 200
    plain.wait_idle()


# -- a reader that stops reading (item 3) ---------------------------------------------------------
def test_slow_reader_does_not_grow_server_memory(plain):
    """A client that reads the first bytes of a stream, then nothing: once the kernel's socket
    buffers are full the response is stuck, while the engine goes on generating. What waits for
    the reader must be this request's unread output merged (O(1) outputs), not one cumulative
    output per step: here 16 samples x 1000 tokens, ~7 MB of SSE, about half of it unsendable."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "n": 16, "max_tokens": 1000, "ignore_eos": True,
            "temperature": 1.0, "seed": 3, "logprobs": 5, "stream": True}
    warm = {**body, "max_tokens": 300}
    with httpx.stream("POST", plain.url + "/v1/completions", json=warm, timeout=300) as r:  # warm-up, read fully
        assert r.status_code == 200
        for _ in r.iter_raw():
            pass
    plain.wait_idle()
    gen_before = plain.metrics()["qwenrun:generation_tokens_total"]
    base = _rss_bytes(plain.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes little, then nothing
    sock.connect(("127.0.0.1", plain.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    assert sock.recv(512).startswith(b"HTTP/1.1 200")
    try:
        deadline = time.monotonic() + 300
        while plain.metrics()["qwenrun:generation_tokens_total"] < gen_before + 16000:  # the engine finished it
            assert time.monotonic() < deadline
            time.sleep(0.2)
        grown = _rss_bytes(plain.proc.pid) - base
    finally:
        sock.close()
    # cumulative outputs queued per step would hold ~450 steps x 16 samples x ~800-entry lists (100+ MB)
    assert grown < 40 * 2**20, f"server RSS grew {grown / 2**20:.1f} MiB under an unread stream"
    plain.wait_idle()
    assert httpx.get(plain.url + "/health", timeout=10).status_code == 200


# -- injected failures and a dead engine (item 2) ---------------------------------------------------
FAULTY = textwrap.dedent("""
    import os, sys
    from qwenrun.engine.model_runner import ModelRunner
    real, state = ModelRunner.execute, {"broken": False, "fired": False}
    MODE, TRIGGER = os.environ["FAULT_MODE"], [7, 7, 7, 7]  # the step holding this prompt fails

    def execute(self, sched):
        hit = any(s.seq.token_ids[:4] == TRIGGER for s in sched.scheduled)
        if hit and MODE == "forever":
            state["broken"] = True
        if state["broken"] or (hit and not state["fired"]):
            state["fired"] = True
            raise RuntimeError("injected step failure")
        return real(self, sched)

    ModelRunner.execute = execute
    from qwenrun.cli import main
    sys.exit(main(["serve", *sys.argv[1:]]))
""")


def _faulty(tiny_ckpt, tmp_path, mode: str) -> ServerProcess:  # noqa: F811
    script = tmp_path / "faulty_serve.py"
    script.write_text(FAULTY)
    srv = ServerProcess(tiny_server_args(tiny_ckpt), tmp_path / f"{mode}.log", launcher=[str(script)],
                        env={"FAULT_MODE": mode})
    srv.wait_ready(120)
    return srv


def test_step_failure_fails_its_request_and_the_next_succeeds(tiny_ckpt, tmp_path):  # noqa: F811
    srv = _faulty(tiny_ckpt, tmp_path, "once")
    try:
        err = _assert_openai_error(_post(srv, "/v1/completions", {"prompt": [7, 7, 7, 7], "max_tokens": 4}), 500)
        assert err["type"] == "server_error" and "injected step failure" in err["message"]
        r = _post(srv, "/v1/completions", {"prompt": [7, 7, 7, 7], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # a streamed request whose step fails after the 200 gets an in-band error event
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        srv.wait_idle()
    finally:
        assert srv.stop() == 0


def test_engine_that_cannot_continue_turns_health_503_and_exits_nonzero(tiny_ckpt, tmp_path):  # noqa: F811
    srv = _faulty(tiny_ckpt, tmp_path, "forever")
    try:
        codes = []
        for i, prompt in enumerate(([7, 7, 7, 7], [1, 2], [3, 4], [5, 6])):
            try:
                r = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
            except httpx.TransportError:
                # The process may exit between the last answer and this request (a fast CPU gets
                # there first): a refused connection after the first 500 is the same truth as a 503.
                assert i > 0, "the server was gone before the first request"
                break
            codes.append(r.status_code)
            if r.status_code == 503 or srv.proc.poll() is not None:
                break
        assert codes[0] == 500 and all(c in (500, 503) for c in codes), codes
        try:
            h = httpx.get(srv.url + "/health", timeout=5).status_code
            assert h == 503
        except httpx.TransportError:
            pass  # already gone: also the truth
        assert srv.proc.wait(60) == 1
        assert "the engine stopped" in srv.log()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.stop()


# -- a disconnect storm on the demo model (the issue's crash) ------------------------------------
@pytest.fixture(scope="module")
def demo_srv(tmp_path_factory):
    with serving(["demo", "--max-model-len", "2048", "--kv-cache-memory", "0.5"],
                 tmp_path_factory.mktemp("log") / "demo_storm.log") as srv:
        yield srv


@pytest.mark.slow
def test_disconnect_storm_leaves_a_healthy_server(demo_srv):
    rng = random.Random(20261201)
    plans = []
    for i in range(240):
        # answers of 32+ tokens (ignore_eos) outlast every abandon time, even on a fast CPU
        plans.append({"stream": rng.random() < 0.5, "chat": rng.random() < 0.7, "max_tokens": rng.randint(32, 96),
                      "abandon_after": rng.choice([0.001, 0.005, 0.02, 0.1, 0.3, 0.6]) * (0.5 + rng.random())})
    abandoned = [0]

    async def one(client: httpx.AsyncClient, p: dict, sem: asyncio.Semaphore) -> None:
        body = ({"messages": [{"role": "user", "content": "Write a short poem about the sea."}]} if p["chat"]
                else {"prompt": "def fibonacci(n):"})
        body.update(max_tokens=p["max_tokens"], stream=p["stream"], temperature=0.7, ignore_eos=True)
        path = "/v1/chat/completions" if p["chat"] else "/v1/completions"

        async def go():
            if p["stream"]:
                async with client.stream("POST", path, json=body) as r:
                    async for _ in r.aiter_raw():
                        pass
            else:
                await client.post(path, json=body)

        async with sem:
            try:
                await asyncio.wait_for(go(), p["abandon_after"])
            except asyncio.TimeoutError:
                abandoned[0] += 1

    async def storm():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=demo_srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            await asyncio.gather(*(one(client, p, sem) for p in plans))

    asyncio.run(storm())
    assert abandoned[0] >= 200, abandoned[0]
    demo_srv.wait_idle()
    c = demo_srv.client()
    out = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                    temperature=0, max_tokens=16)
    assert "Paris" in out.choices[0].message.content
    assert httpx.get(demo_srv.url + "/health", timeout=10).status_code == 200
    m = demo_srv.wait_idle()
    assert m["qwenrun:kv_cache_usage_perc"] == 0
    log = demo_srv.log_path.read_text(errors="replace")
    assert "engine loop crashed" not in log and "Traceback" not in log
