"""``qwenrun chat``: a multi-turn REPL with streaming, against a local model or a server (--url).

/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the current answer and
keeps the session."""
from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

from .settings import ChatConfig

HELP = "Commands: /reset clears the conversation, /exit quits. Ctrl-C stops an answer."


class LocalChat:
    def __init__(self, llm, params) -> None:
        self.llm, self.params = llm, params
        self.name = llm.engine.loaded.name

    def stream(self, messages: list[dict]) -> Iterator[str]:
        prompt = self.llm.apply_chat_template(messages)
        shown = 0
        gen = self.llm.stream(prompt, self.params)
        try:
            for out in gen:
                text = out.outputs[0].text
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
        finally:
            gen.close()  # Ctrl-C: aborts the request and frees its KV blocks


class HTTPChat:
    """Streams /v1/chat/completions from an OpenAI-compatible server with the standard library."""

    def __init__(self, url: str, api_key: str | None, model: str | None, params) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.params = params
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        req = urllib.request.Request(self.base + "/models", headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)["data"][0]["id"]
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.base}/models answered {e.code}: {e.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"cannot reach {self.base}: {e}") from None

    def stream(self, messages: list[dict]) -> Iterator[str]:
        p = self.params
        body = {"model": self.name, "messages": messages, "stream": True}
        for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"):
            v = getattr(p, k, None)
            if v not in (None, 0.0) or (k == "temperature" and v == 0):
                body[k] = v
        req = urllib.request.Request(self.base + "/chat/completions", data=json.dumps(body).encode(),
                                     headers=self.headers, method="POST")
        try:
            resp = urllib.request.urlopen(req, timeout=600)
        except urllib.error.HTTPError as e:
            raise ValueError(f"server error {e.code}: {e.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"cannot reach {self.base}: {e}") from None
        with resp:  # closing the connection (Ctrl-C) makes the server abort the request
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ValueError(chunk["error"].get("message", str(chunk["error"])))
                for ch in chunk.get("choices", []):
                    delta = ch.get("delta", {}).get("content")
                    if delta:
                        yield delta


def run_repl(cfg: ChatConfig) -> int:
    params = cfg.sampling
    if cfg.url:
        backend = HTTPChat(cfg.url, cfg.api_key, cfg.remote_model, params)
    else:
        from .llm import load_llm

        backend = LocalChat(load_llm(cfg.engine), params)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history: list[dict] = list(system)
    # Ctrl-C must stop an answer even when SIGINT came in ignored (a shell starts background jobs
    # that way, and Python then leaves it ignored): restore Python's KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"Chatting with {backend.name}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        gen = backend.stream(history)
        try:
            for delta in gen:
                sys.stdout.write(delta)
                sys.stdout.flush()
                reply.append(delta)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        finally:
            gen.close()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
