"""Logits and greedy parity with transformers' Qwen2ForCausalLM on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.engine.kv_cache import KVCache
from qwenrun.layers.attention import AttentionMetadata, PrefillSpan
from qwenrun.loader import load
from tiny import hf_model, write_tiny_checkpoint

CONFIGS = {
    "mha-untied-5e6": dict(heads=4, kv_heads=4, tie=False, rope_theta=5e6),
    "gqa-tied-1e6": dict(heads=4, kv_heads=2, tie=True, rope_theta=1e6),
    "odd-sizes": dict(hidden=72, heads=3, kv_heads=1, intermediate=100, layers=3, rope_theta=5e6),
    "explicit-head-dim": dict(hidden=64, heads=4, kv_heads=2, head_dim=32, rope_theta=1e6),
    "sharded": dict(heads=4, kv_heads=4, layers=3, shards=3),
    "sliding-window": dict(heads=4, kv_heads=2, layers=3, use_sliding_window=True, sliding_window=8,
                           max_window_layers=1),
}
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b 你好"


def full_logits(model, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits at every position through qwenrun's paged path (optionally in prefill chunks)."""
    cfg = model.config
    bs = 4
    n_blocks = -(-len(ids) // bs) + 1
    cache = KVCache(cfg.num_hidden_layers, n_blocks, bs, cfg.num_key_value_heads, cfg.head_dim,
                    model.dtype, "cpu")
    slots_all = torch.arange(len(ids))  # block i = blocks[i]: identity block table
    chunk = chunk or len(ids)
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            e = min(len(ids), s + chunk)
            meta = AttentionMetadata(slot_mapping=slots_all[s:e])
            meta.prefills.append(PrefillSpan(0, e - s, e, slots_all[:e] if s else None))
            h = model(torch.tensor(ids[s:e]), torch.arange(s, e), meta, cache)
            out.append(model.compute_logits(h))
    return torch.cat(out)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return request.param, write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


def test_logits_match_transformers_fp32(checkpoint):
    name, path = checkpoint
    lm = load(EngineConfig(model=str(path), dtype="float32"), progress=False)
    ids = lm.tokenizer.encode(PROMPT)
    assert len(ids) > 20
    ref = hf_model(path)(torch.tensor([ids])).logits[0].float()
    ours = full_logits(lm.model, ids)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"{name}: max |logit diff| {err:.2e}"
    # Chunked prefill reads earlier chunks' keys from the cache: same logits.
    err_chunked = (full_logits(lm.model, ids, chunk=5) - ref).abs().max().item()
    assert err_chunked <= 1e-4, f"{name}: chunked max |logit diff| {err_chunked:.2e}"


def test_greedy_continuation_matches_transformers(checkpoint):
    name, path = checkpoint
    llm = LLM(str(path), dtype="float32", kv_cache_memory=0.05, block_size=4)
    ids = llm.get_tokenizer().encode(PROMPT)
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.0))[0].outputs[0]
    ref = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                  repetition_penalty=1.0, top_p=None, top_k=None, temperature=None)
    assert out.token_ids == ref[0, len(ids):].tolist(), name
    assert len(out.token_ids) == 40 and out.finish_reason == "length"


def test_bf16_close_to_transformers_bf16(tiny_dir):
    """bf16 follows the reference's rounding points (RMSNorm cast before the weight, RoPE in the
    activation dtype), so bf16 logits agree to bf16 precision."""
    lm = load(EngineConfig(model=str(tiny_dir), dtype="bfloat16"), progress=False)
    ids = lm.tokenizer.encode(PROMPT)
    ref = hf_model(tiny_dir, dtype=torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    ours = full_logits(lm.model, ids)
    ref32 = hf_model(tiny_dir)(torch.tensor([ids])).logits[0].float()
    ours_err = (ours - ref32).abs().max().item()
    hf_err = (ref - ref32).abs().max().item()
    # Our bf16 error against fp32 is of the same size as transformers' own bf16 error.
    assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_fused_qkv_equals_separate_projections(tiny_dir):
    """The q/k/v fusion applied after loading (dense here; quantized in test_quant) changes nothing."""
    lm = load(EngineConfig(model=str(tiny_dir), dtype="float32"), progress=False)
    assert lm.model.model.layers[0].self_attn.qkv_proj is None  # mmap-backed weights stay unfused
    ids = lm.tokenizer.encode(PROMPT)
    before = full_logits(lm.model, ids)
    lm.model.fuse_qkv()
    assert lm.model.model.layers[0].self_attn.qkv_proj is not None
    assert (full_logits(lm.model, ids) - before).abs().max().item() <= 1e-5
