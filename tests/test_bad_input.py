"""Bad input gets a clear error naming the problem: ValueError in Python, one line from the CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from qwenrun import LLM, ModelLoadError, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.loader import load


def _load(path, **kw):
    return load(EngineConfig(model=str(path), **kw), progress=False)


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_unknown_local_path():
    with pytest.raises(ModelLoadError, match="not found"):
        _load("./no/such/model")


def test_unreachable_hub_says_how_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from qwenrun.loader import resolve

    with pytest.raises(ModelLoadError) as e:
        resolve("Qwen/Qwen1.5-4B-Chat", progress=False)
    msg = str(e.value)
    assert "local path" in msg and "\n" not in msg


def test_truncated_safetensors(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(m)


def test_garbage_safetensors(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    (m / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        _load(m)


def test_truncated_gguf(demo_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(demo_path, "rb") as src:
        bad.write_bytes(src.read(50_000_000))
    with pytest.raises(ModelLoadError, match="truncated"):
        _load(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="bad magic"):
        _load(bad)


def test_other_architecture(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'"):
        _load(m)


def test_missing_config(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    (m / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(m)


def _rewrite_weights(m, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(m / "model.safetensors"))
    fn(sd)
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    _rewrite_weights(m, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        _load(m)


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    import torch

    m = _copy(tiny_dir, tmp_path)
    _rewrite_weights(m, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        _load(m)


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
    import torch

    m = _copy(tiny_dir, tmp_path)
    _rewrite_weights(m, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has shape \(3,\)"):
        _load(m)


def test_missing_shard_named_by_the_index(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        _load(m)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(str(tiny_dir), kv_cache_memory=0.05, max_model_len=256)


def test_empty_prompt(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([""], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate(prompt_token_ids=[[]], sampling_params=SamplingParams(max_tokens=4))


def test_prompt_longer_than_context(tiny_llm):
    with pytest.raises(ValueError, match=r"300 tokens but the context is 256"):
        tiny_llm.generate(prompt_token_ids=[[5] * 300], sampling_params=SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=r"plus max_tokens \(100\) is 300"):
        tiny_llm.generate(prompt_token_ids=[[5] * 200], sampling_params=SamplingParams(max_tokens=100))
    assert not tiny_llm.engine.has_unfinished_requests()  # nothing left behind


def test_token_ids_outside_vocab(tiny_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate(prompt_token_ids=[[1, 10**6]], sampling_params=SamplingParams(max_tokens=4))


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-5), "top_k"), (dict(n=0), "n must"),
    (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(logprobs=50), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(stop=5), "stop"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(temperature=float("nan")), "temperature"), (dict(max_tokens=2.5), "max_tokens"),
])
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_invalid_engine_options():
    for kw, msg in [(dict(dtype="float8"), "dtype"), (dict(quantization="int3"), "quantization"),
                    (dict(block_size=12), "block_size"), (dict(max_model_len=0), "max_model_len"),
                    (dict(kv_cache_dtype="int4"), "kv_cache_dtype")]:
        with pytest.raises(ValueError, match=msg):
            EngineConfig(model="demo", **kw)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qwenrun.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,needle", [
    (["generate", "./no/such/dir", "--prompt", "hi"], "not found"),
    (["generate", "demo", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["pull", "Qwen/Qwen1.5-4B-Chat"], "local path"),
])
def test_cli_prints_one_line_and_no_traceback(args, needle, tmp_path):
    r = _cli(*args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]


def test_cli_generate_streams_text(tiny_dir):
    r = _cli("generate", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0",
             "--max-model-len", "128", "--kv-cache-memory", "0.05")
    assert r.returncode == 0, r.stderr
    assert "Loaded" in r.stderr and "KV pool" in r.stderr
    assert r.stdout.strip()
