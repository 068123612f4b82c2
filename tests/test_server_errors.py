"""Server error paths, one test per case: status code and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``. Plus the API key, the body limit, the bounded
queue (503 + Retry-After), load failure, and SIGTERM (graceful, exit code 0)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from test_server import REPO, ServerProcess, free_port, tiny_ckpt  # noqa: F401 - tiny_ckpt is a fixture

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 1024
MAX_BODY = 16384


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, tmp_path_factory):  # noqa: F811
    """--api-key, one running sequence at most, one waiting at most, a 16 KiB body limit."""
    srv = ServerProcess([str(tiny_ckpt), "--served-model-name", "tiny", "--max-model-len", str(CONTEXT),
                         "--kv-cache-memory", "0.25", "--api-key", KEY, "--max-num-seqs", "1", "--max-waiting", "1",
                         "--max-body-bytes", str(MAX_BODY)], tmp_path_factory.mktemp("log") / "guarded.log")
    try:
        srv.wait_ready(120)
        yield srv
        # No client mistake in this module may have turned into a 500.
        assert not any(k.startswith("qwenrun:http_requests_total{status=5") and not k.endswith("503}")
                       for k in srv.metrics()), srv.metrics()
    finally:
        srv.stop()


def assert_error(r: httpx.Response, status: int, *, param: str | None = "any", code: str | None = "any",
                 contains: tuple[str, ...] = ()) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    for s in contains:
        assert s in err["message"], err
    return err


def chat_body(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


def post(srv: ServerProcess, path: str, body=None, *, raw: bytes | None = None, headers=AUTH) -> httpx.Response:
    if raw is not None:
        return httpx.post(srv.url + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


# -- 400: every invalid body ------------------------------------------------------------------------
def test_bad_json(guarded):
    assert_error(post(guarded, "/v1/chat/completions", raw=b'{"messages": [}'), 400, contains=("not valid JSON",))


def test_body_not_an_object(guarded):
    assert_error(post(guarded, "/v1/completions", [1, 2]), 400, contains=("JSON object",))


def test_wrong_type(guarded):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(temperature="hot")), 400, param="temperature")


def test_wrong_type_no_coercion(guarded):  # "4" is not 4: OpenAI rejects it, so do we
    assert_error(post(guarded, "/v1/completions", {"prompt": "Hi", "max_tokens": "4"}), 400, param="max_tokens")


def test_missing_messages(guarded):
    assert_error(post(guarded, "/v1/chat/completions", {"model": "tiny"}), 400, param="messages")


def test_empty_messages(guarded):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(messages=[])), 400, param="messages",
                 contains=("non-empty",))


def test_bad_role(guarded):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(messages=[{"role": "wizard", "content": "x"}])),
                 400, contains=("role",))


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 1.5), ("top_p", 0), ("max_tokens", 0),
                                         ("n", 0), ("presence_penalty", 3), ("top_k", -5), ("min_p", 2)])
def test_out_of_range(guarded, field, value):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(**{field: value})), 400, param=field,
                 contains=(field,))


def test_top_logprobs_out_of_range(guarded):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=50)), 400,
                 param="top_logprobs", code="limit_exceeded", contains=("at most 20", "--max-logprobs"))


def test_tool_choice_bad_values_are_400(guarded):
    # "required" and a named function are served (grammar-forced calls, issue 11); these are not
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for extra, words in (({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g'"),
                         ({"tool_choice": "required"}, "needs tools"),
                         ({"tools": tools, "tool_choice": "maybe"}, "'maybe'")):
        assert_error(post(guarded, "/v1/chat/completions", chat_body(**extra)), 400,
                     param="tool_choice", contains=(words,))


def test_top_logprobs_without_logprobs(guarded):
    assert_error(post(guarded, "/v1/chat/completions", chat_body(top_logprobs=2)), 400, param="top_logprobs")


def test_bad_stop_and_logit_bias(guarded):
    assert_error(post(guarded, "/v1/completions", {"prompt": "Hi", "stop": 5}), 400, param="stop")
    assert_error(post(guarded, "/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 1}}), 400,
                 param="logit_bias")


def test_prompt_token_outside_vocab(guarded):
    assert_error(post(guarded, "/v1/completions", {"prompt": [1, 10**6]}), 400, contains=("vocabulary",))


def test_empty_prompt(guarded):
    assert_error(post(guarded, "/v1/completions", {"prompt": []}), 400, param="prompt")


def test_max_tokens_beyond_context(guarded):
    err = assert_error(post(guarded, "/v1/completions", {"prompt": "Hello world", "max_tokens": 5000}), 400,
                       param="max_tokens")
    assert "5000" in err["message"] and str(CONTEXT) in err["message"]  # the numbers, not just "too long"


def test_prompt_beyond_context(guarded):
    err = assert_error(post(guarded, "/v1/completions", {"prompt": [5] * (CONTEXT + 10)}), 400)
    assert str(CONTEXT + 10) in err["message"] and str(CONTEXT) in err["message"]


def test_completions_default_max_tokens_is_16(guarded):
    # OpenAI's (and vLLM's) default for /v1/completions; a 1-token prompt used to run to the end
    r = post(guarded, "/v1/completions", {"prompt": [5], "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"


def test_chat_default_max_tokens_is_rest_of_context(guarded):
    body = chat_body(ignore_eos=True, temperature=0)
    del body["max_tokens"]
    body["messages"][0]["content"] = "Hi " * 100
    r = post(guarded, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT
    assert r.json()["choices"][0]["finish_reason"] == "length"


# -- 401, 404, 405, 413 ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                         ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_missing_key_401(guarded, method, path):
    r = httpx.request(method, guarded.url + path, json={"prompt": "Hi", "tokens": [1]})
    assert_error(r, 401, code="invalid_api_key", contains=("no API key",))


def test_wrong_key_401(guarded):
    with pytest.raises(openai.AuthenticationError) as e:
        guarded.client(api_key="wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 401 and "wrong API key" in e.value.message


def test_key_accepted_and_probes_open(guarded):
    r = guarded.client(api_key=KEY).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=3)
    assert r.usage.completion_tokens <= 3
    assert httpx.get(guarded.url + "/health").status_code == 200  # no key needed
    assert httpx.get(guarded.url + "/metrics").status_code == 200


def test_unknown_model_404(guarded):
    with pytest.raises(openai.NotFoundError) as e:
        guarded.client(api_key=KEY).completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found" and "gpt-4" in e.value.message


def test_unknown_route_404(guarded):
    assert_error(httpx.get(guarded.url + "/nope"), 404, code="not_found")
    assert_error(httpx.post(guarded.url + "/v1/nope", headers=AUTH, json={}), 404, code="not_found")


def test_wrong_method_405(guarded):
    assert_error(httpx.get(guarded.url + "/v1/chat/completions", headers=AUTH), 405)


def test_body_too_large_413(guarded):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 100)}])).encode()
    assert_error(post(guarded, "/v1/chat/completions", raw=big), 413, code="request_too_large",
                 contains=(str(MAX_BODY),))


def test_chunked_body_too_large_413(guarded):
    # No Content-Length (chunked upload): the server must count what it receives.
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 100)}])).encode()

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = httpx.post(guarded.url + "/v1/chat/completions", content=chunks(), headers=AUTH)
    assert "content-length" not in r.request.headers
    assert_error(r, 413, code="request_too_large")


# -- 503: the bounded queue ------------------------------------------------------------------------
def test_queue_full_503(guarded):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=AUTH) as a, httpx.Client(timeout=60, headers=AUTH) as b:
        with a.stream("POST", guarded.url + "/v1/completions", json=body) as running:  # takes the only seat
            assert running.status_code == 200
            waiting_done = threading.Event()
            got_b: list[int] = []

            def second() -> None:  # queued behind A: its headers come once A is gone
                with b.stream("POST", guarded.url + "/v1/completions", json=body) as r:
                    got_b.append(r.status_code)
                waiting_done.set()

            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 10
            while guarded.metrics()["qwenrun:num_requests_waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert guarded.metrics()["qwenrun:num_requests_running"] == 1
            r = post(guarded, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            err = assert_error(r, 503, code="queue_full")
            assert r.headers["retry-after"] == "1" and "busy" in err["message"]
        # A's connection closed: A is aborted, B gets the seat (and is closed at once).
        assert waiting_done.wait(20) and got_b == [200]
        t.join()


# -- process lifecycle -----------------------------------------------------------------------------
def test_load_failure_exits_nonzero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwenrun.cli", "serve", str(tmp_path / "missing"),
                        "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "qwenrun: error:" in r.stderr


def _stream_then_sigterm(srv: ServerProcess, max_tokens: int) -> tuple[list, float]:
    """Start a stream, SIGTERM the server after its first event, read what is left."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    events: list = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(json.loads(line[6:]))
                break
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
        except (httpx.HTTPError, json.JSONDecodeError):
            pass  # the grace period ran out: the server cut the stream (possibly mid-event)
    return events, t0


def _sigterm_midstream(ckpt, log: Path, max_model_len: int, grace: int, max_tokens: int) -> tuple[list, float, str]:
    """Serve, stream, SIGTERM after the first event; the server must exit 0. Returns the events,
    the seconds from SIGTERM to exit, and the server's log."""
    srv = ServerProcess([str(ckpt), "--max-model-len", str(max_model_len), "--kv-cache-memory", "0.1",
                         "--shutdown-grace", str(grace), "--served-model-name", "tiny"], log)
    try:
        srv.wait_ready(120)
        events, t0 = _stream_then_sigterm(srv, max_tokens)
        assert srv.proc.wait(30) == 0, srv.log()
        return events, time.monotonic() - t0, srv.log()
    finally:
        srv.stop()


def test_sigterm_lets_inflight_finish_and_exits_0(tiny_ckpt, tmp_path):  # noqa: F811
    events, _, log = _sigterm_midstream(tiny_ckpt, tmp_path / "term.log", 512, grace=20, max_tokens=300)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "Shutting down" in log


def test_sigterm_aborts_after_grace_and_exits_0(tiny_ckpt, tmp_path):  # noqa: F811
    events, elapsed, _ = _sigterm_midstream(tiny_ckpt, tmp_path / "term2.log", 4096, grace=1, max_tokens=4000)
    assert "[DONE]" not in events and len(events) < 4000  # cut, not finished
    assert elapsed < 15, elapsed
