"""The OpenAI-compatible server, black-box: the real ``qwenrun serve`` process on a loopback port,
driven by the official ``openai`` client (and httpx for raw SSE / metrics).

Two servers per module run: the real ``demo`` model (real text, health while loading, the chat
REPL) and a tiny random checkpoint (fast: batching, disconnects, parameters). Error cases, the API
key, the bounded queue and SIGTERM live in test_server_errors.py."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


# -- harness (also imported by test_server_errors.py) ----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``qwenrun serve ARGS`` in a subprocess; output goes to a file (a pipe could fill and block)."""

    def __init__(self, args: list[str], log_path: Path, launcher: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "QWENRUN_THREADS": "2", **(env or {})}
        # launcher: what runs `serve ARGS` (a test may wrap the CLI to inject faults)
        launcher = launcher or ["-m", "qwenrun.cli", "serve"]
        self.proc = subprocess.Popen([sys.executable, *launcher, *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.health_seen: list[int] = []  # status codes of /health until ready

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 240.0, while_loading=None) -> None:
        """Poll /health until 200. ``while_loading(server)`` runs once, at the first 503."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                code = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if code == 503 and while_loading is not None and 503 not in self.health_seen:
                while_loading(self)
            self.health_seen.append(code)
            if code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict[str, float]:
        """Samples as ``name{k=v,...}`` (labels sorted, model_name dropped) → value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once no sequence runs or waits and no KV block is in use (AssertionError if never)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["qwenrun:num_requests_running"] == 0 and m.get("qwenrun:num_requests_waiting", 0) == 0
                    and m["qwenrun:kv_cache_usage_perc"] == 0):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {m}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def serving(args: list[str], log_path: Path, timeout: float = 300, **kw) -> Iterator[ServerProcess]:
    """A ready server for the duration of a ``with`` (module fixtures: ``with serving(...) as s: yield s``)."""
    srv = ServerProcess(args, log_path, **kw)
    try:
        srv.wait_ready(timeout)
        yield srv
    finally:
        srv.stop()


def sse_events(resp: httpx.Response) -> list[dict | str]:
    """The data: payloads of an SSE response, JSON-decoded ("[DONE]" stays a string)."""
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def tiny_server_args(path: Path) -> list[str]:
    return [str(path), "--served-model-name", "tiny", "--max-model-len", "2048", "--kv-cache-memory", "0.25",
            "--block-size", "16", "--max-num-seqs", "32"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    # max_pos 4096: room for long streams (disconnect and batching tests need requests that last).
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_srv"), max_pos=4096)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tmp_path_factory):
    with serving(tiny_server_args(tiny_ckpt), tmp_path_factory.mktemp("log") / "tiny.log", 120) as srv:
        yield srv


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    loading: dict = {}

    def probe(srv: ServerProcess) -> None:  # the model is still loading: inference must be a 503
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       timeout=10)
        loading.update(status=r.status_code, body=r.json(), retry_after=r.headers.get("retry-after"))

    srv = ServerProcess(["demo", "--max-model-len", "2048", "--kv-cache-memory", "0.5"],
                        tmp_path_factory.mktemp("log") / "demo.log")
    try:
        srv.wait_ready(300, while_loading=probe)
        srv.loading = loading
        yield srv
    finally:
        srv.stop()


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# -- the real model ------------------------------------------------------------------------------
def test_health_and_inference_503_while_loading(demo):
    # The listener is up before the ~10 s load ends: /health said 503 first, then 200.
    assert demo.health_seen[0] == 503 and demo.health_seen[-1] == 200
    assert demo.loading["status"] == 503 and demo.loading["retry_after"]
    assert demo.loading["body"]["error"]["code"] == "model_loading"


def test_demo_chat_answers_paris(demo):
    r = demo.client().chat.completions.create(model="demo", messages=CHAT, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "demo"


def test_demo_stream_equals_nonstream_and_usage_matches_tokenizer(demo):
    c = demo.client()
    full = c.chat.completions.create(model="demo", messages=CHAT, temperature=0, max_tokens=16, logprobs=True)
    stream = c.chat.completions.create(model="demo", messages=CHAT, temperature=0, max_tokens=16, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    # prompt_tokens = the rendered template through the tokenizer; completion_tokens = one per
    # generated token (the answer's tokens plus the closing <|im_end|>).
    tok = httpx.post(demo.url + "/tokenize", json={"messages": CHAT}).json()
    assert full.usage.prompt_tokens == tok["count"]
    content = full.choices[0].logprobs.content
    assert full.usage.completion_tokens == len(content)
    assert "".join(t.token for t in content) == full.choices[0].message.content + "<|im_end|>"
    answer = httpx.post(demo.url + "/tokenize", json={"prompt": full.choices[0].message.content}).json()
    assert answer["count"] + 1 == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_demo_completions_stream_equals_nonstream(demo):
    c = demo.client()
    kw = dict(model="demo", prompt="def fibonacci(n):", temperature=0, max_tokens=10)
    full = c.completions.create(**kw)
    text = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices)
    assert text == full.choices[0].text and len(text) > 5
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def test_demo_tool_call_stream_and_nonstream_then_tool_result(demo):
    c = demo.client()
    kw = dict(model="demo", messages=ASK_WEATHER, tools=WEATHER, temperature=0, max_tokens=64)
    ch = c.chat.completions.create(**kw).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the same call arrives as tool_call deltas, and no JSON leaks into the content
    content, name, args, finish = "", "", "", None
    for chunk in c.chat.completions.create(**kw, stream=True):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            assert tc.index == 0
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, name, json.loads(args), finish) == ("", "get_weather", {"city": "Paris"}, "tool_calls")
    # the tool's result goes back in (arguments as OpenAI's JSON string): the model answers in text
    msgs = ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    ans = c.chat.completions.create(**{**kw, "messages": msgs}).choices[0]
    assert ans.finish_reason == "stop" and not ans.message.tool_calls and "18" in ans.message.content
    # tool_choice="none": the tools are left out and the answer is text
    plain = c.chat.completions.create(**kw, tool_choice="none").choices[0]
    assert not plain.message.tool_calls and plain.message.content and plain.finish_reason in ("stop", "length")


def test_chat_repl_against_server(demo):
    r = subprocess.run([sys.executable, "-m", "qwenrun.cli", "chat", "--url", demo.url, "--temperature", "0",
                        "--max-tokens", "16"], input="What is the capital of France?\n/exit\n",
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Chatting with demo" in r.stderr


# -- the tiny model: parameters --------------------------------------------------------------------
def test_models_and_tokenize_roundtrip(tiny):
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].max_model_len == 2048
    t = httpx.post(tiny.url + "/tokenize", json={"model": "tiny", "prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 2048
    d = httpx.post(tiny.url + "/detokenize", json={"model": "tiny", "tokens": t["tokens"]}).json()
    assert d == {"prompt": "Hello world"}


def test_completion_prompt_forms_and_echo(tiny):
    c = tiny.client()
    ids = httpx.post(tiny.url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    by_text = c.completions.create(model="tiny", prompt="Hello world", temperature=0, max_tokens=6)
    by_ids = c.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=6)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 6
    batch = c.completions.create(model="tiny", prompt=["Hello world", "Paris is"], temperature=0, max_tokens=6)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text
    batch_ids = c.completions.create(model="tiny", prompt=[ids, ids], temperature=0, max_tokens=6)
    assert [ch.text for ch in batch_ids.choices] == [by_text.choices[0].text] * 2
    assert batch_ids.usage.prompt_tokens == 2 * len(ids) and batch_ids.usage.completion_tokens == 12
    echo = c.completions.create(model="tiny", prompt="Hello world", temperature=0, max_tokens=6, echo=True)
    assert echo.choices[0].text == "Hello world" + by_text.choices[0].text


def test_stream_equals_nonstream_tiny(tiny):
    c = tiny.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                  {"type": "text", "text": " world"}]}],
              temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kw)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                   if ch.choices)
    assert text == full.choices[0].message.content and full.usage.completion_tokens == 40


def test_n2_stream_and_nonstream(tiny):
    c = tiny.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=1.0, seed=7, n=2,
              max_tokens=12, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kw)
    assert [ch.index for ch in full.choices] == [0, 1]
    texts = [ch.message.content for ch in full.choices]
    assert texts[0] != texts[1]  # two samples, not one copied
    assert full.usage.completion_tokens == 24
    streamed = ["", ""]
    finishes = {}
    for ch in c.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert streamed == texts and finishes == {0: "length", 1: "length"}


def test_seed_reproducible(tiny):
    c = tiny.client()
    kw = dict(model="tiny", prompt="The quick brown fox", temperature=1.0, max_tokens=16)
    a = c.completions.create(**kw, seed=1234).choices[0].text
    b = c.completions.create(**kw, seed=1234).choices[0].text
    other = c.completions.create(**kw, seed=99).choices[0].text
    assert a == b and a != other


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(tiny, stream):
    c = tiny.client()
    kw = dict(model="tiny", prompt="Hello world", temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    base = c.completions.create(**kw).choices[0].text
    stop = base[8:11]  # a piece from the middle: the answer must end right before its first occurrence
    want = base[:base.find(stop)]
    if stream:
        chunks = list(c.completions.create(**kw, stop=[stop, "never-appears"], stream=True))
        text = "".join(ch.choices[0].text for ch in chunks)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
    else:
        r = c.completions.create(**kw, stop=stop)
        text, finish = r.choices[0].text, [r.choices[0].finish_reason]
    assert text == want and finish == ["stop"]


def test_chat_top_logprobs(tiny):
    r = tiny.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert item.logprob == pytest.approx(tops[0])  # greedy: the sampled token is the most likely
        assert item.token == item.top_logprobs[0].token and bytes(item.bytes).decode(errors="replace") == item.token


def test_completion_logprobs_and_echo(tiny):
    c = tiny.client()
    r = c.completions.create(model="tiny", prompt="Hello world", temperature=0, max_tokens=5, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(val) and top[tok] == pytest.approx(val)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    e = c.completions.create(model="tiny", prompt="Hello world", temperature=0, max_tokens=5, logprobs=2, echo=True,
                             extra_body={"ignore_eos": True}).choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert e.token_logprobs[0] is None and len(e.tokens) == n_prompt + 5
    assert all(isinstance(v, float) for v in e.token_logprobs[1:]) and e.token_logprobs[n_prompt:] == lp.token_logprobs


def test_logit_bias_forces_a_token(tiny):
    target = httpx.post(tiny.url + "/tokenize", json={"prompt": "Paris"}).json()["tokens"][0]
    piece = httpx.post(tiny.url + "/detokenize", json={"tokens": [target]}).json()["prompt"]
    r = tiny.client().completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=4,
                                         logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == piece * 4


def test_penalties_and_extras_accepted(tiny):
    r = tiny.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}],
        temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, max_completion_tokens=5,
        user="someone", extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "unknown_field": 1})
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")


# -- the tiny model: batching, disconnects ---------------------------------------------------------
def test_concurrent_streams_are_batched_and_correct(tiny):
    prompts = [f"Request number {i}: hello" for i in range(8)]
    kw = dict(model="tiny", temperature=0, max_tokens=80, extra_body={"ignore_eos": True})
    sync = tiny.client()
    expected = [sync.completions.create(prompt=p, **kw).choices[0].text for p in prompts]  # one at a time

    running_seen: list[float] = []
    stop = threading.Event()

    def poll() -> None:  # sample the running gauge while the streams run
        while not stop.is_set():
            running_seen.append(tiny.metrics()["qwenrun:num_requests_running"])
            time.sleep(0.02)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        parts = []
        async for ch in await client.completions.create(prompt=prompt, stream=True, **kw):
            parts.append(ch.choices[0].text)
        return "".join(parts)

    async def all_at_once() -> list[str]:
        client = openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        got = asyncio.run(all_at_once())
    finally:
        stop.set()
        poller.join()
    assert got == expected  # batched greedy output == one-at-a-time greedy output
    assert max(running_seen) >= 2, running_seen
    assert tiny.metrics()["qwenrun:max_num_running_seen"] >= 2


def test_disconnect_aborts_and_frees_kv(tiny):
    """10 streams cut mid-way plus one non-streamed request abandoned: all aborted, KV back to 0."""
    before = tiny.metrics()
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 1800, "ignore_eos": True, "stream": True,
            "temperature": 0}
    clients = [httpx.Client(timeout=60) for _ in range(10)]
    streams = []
    try:
        for cl in clients:
            cm = cl.stream("POST", tiny.url + "/v1/completions", json=body)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(4)) if ln.startswith("data:")]
            assert got  # mid-way: some tokens arrived, most have not
            streams.append((cm, lines))  # keep the line iterator: collecting it would close the stream
        mid = tiny.metrics()
        assert mid["qwenrun:num_requests_running"] == 10 and mid["qwenrun:kv_cache_usage_perc"] > 0
        # An 11th, not streamed: the client gives up waiting for the whole answer.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for cl in clients:
            cl.close()  # the connections drop: the server must abort all 10
    m = tiny.wait_idle(20)
    key = "qwenrun:request_success_total{finished_reason=abort}"
    assert m[key] - before.get(key, 0) == 11
    generated = m["qwenrun:generation_tokens_total"] - before["qwenrun:generation_tokens_total"]
    assert generated < 11 * 1800 / 2  # stopped early, not run to max_tokens
