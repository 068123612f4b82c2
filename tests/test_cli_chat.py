"""The chat REPL (multi-turn, /reset, /exit, Ctrl-C stops an answer but not the session) and hub
resolution against a patched download (no test reaches the hub)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenrun import LLM


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "qwenrun.cli", "chat", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


# per stream: what was read past the last needle (a chunk may hold several). Keyed by the stream
# object, not its fd: a later process may get the same fd number.
_unread: dict[object, bytes] = {}


def _read_until(stream, needle: str, timeout: float = 120) -> str:
    """Read until ``needle``; returns the text up to and including it, keeps the rest for the next call."""
    import select

    fd, end = stream.fileno(), time.time() + timeout
    buf = _unread.pop(stream, b"")
    while needle.encode() not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-500:]!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stream closed before {needle!r}; got {buf[-500:]!r}")
            buf += chunk
    cut = buf.index(needle.encode()) + len(needle.encode())
    _unread[stream] = buf[cut:]
    return buf[:cut].decode(errors="replace")


def test_repl_multi_turn_reset_and_exit(tiny_dir):
    p = _spawn(str(tiny_dir), "--max-model-len", "256", "--kv-cache-memory", "0.05", "--temperature", "0",
               "--max-tokens", "5")
    out, err = p.communicate("Hello\nAnd again\n/reset\nHello\n/exit\n", timeout=120)
    assert p.returncode == 0, err
    assert "Chatting with" in err and "(conversation cleared)" in err
    answers = [ln for ln in out.split(">>> ") if ln.strip()]
    assert len(answers) == 3
    assert answers[0] == answers[2]  # after /reset the first turn is answered as before


def test_ctrl_c_stops_the_answer_and_keeps_the_session():
    # the demo model: slow enough (tens of ms per token) to be interrupted mid-answer
    p = _spawn("demo", "--max-model-len", "2048", "--kv-cache-memory", "0.2", "--temperature", "0",
               "--max-tokens", "500", "--ignore-eos")
    _read_until(p.stderr, "Chatting with")
    p.stdin.write("Count from 1 to 500, one number per line.\n")
    p.stdin.flush()
    _read_until(p.stdout, "10")  # the answer is streaming
    p.send_signal(signal.SIGINT)
    _read_until(p.stdout, "[stopped]")
    _read_until(p.stdout, ">>> ")  # the session goes on: a new prompt
    p.stdin.write("/exit\n")
    p.stdin.flush()
    assert p.wait(timeout=60) == 0


def test_hub_id_resolves_through_huggingface_hub(monkeypatch, tiny_dir):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    llm = LLM("Qwen/Qwen1.5-4B-Chat@abc123", max_model_len=128, kv_cache_memory=0.01)
    assert calls == [("Qwen/Qwen1.5-4B-Chat", "abc123", calls[0][2])]
    assert "*.safetensors" in calls[0][2] and "*.json" in calls[0][2]
    assert llm.engine.loaded.name == Path(tiny_dir).name


def test_hub_gguf_file_form(monkeypatch, demo_path):
    import huggingface_hub

    from qwenrun.loader import resolve

    seen = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None, **kw: seen.append((repo, filename)) or str(demo_path))
    src = resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    assert src.kind == "gguf" and seen == [("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                                            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")]


@pytest.mark.parametrize("bad", ["not a model id!", "../relative/missing"])
def test_bad_names_never_reach_the_hub(bad, monkeypatch):
    import huggingface_hub

    from qwenrun.errors import ModelLoadError
    from qwenrun.loader import resolve

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was called"))
    with pytest.raises(ModelLoadError, match="not found"):
        resolve(bad)
