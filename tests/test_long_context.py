"""Long context: positions beyond 16K match transformers with chunked prefill, RoPE angles stay
right at 32767, int8 KV stays within a stated bound, memory planning refuses what cannot fit."""
from __future__ import annotations

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.layers.rotary import rope_table
from qwenrun.loader import load
from test_model_parity import full_logits
from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("long"), hidden=64, heads=4, kv_heads=2, layers=2,
                                 max_pos=32768, rope_theta=5e6, seed=3)


def test_rope_angles_at_32k_match_transformers_and_float64():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=2560, num_attention_heads=20, max_position_embeddings=32768, rope_theta=5e6)
    rot = Qwen2RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 16383, 16384, 32766, 32767]])
    cos, sin = rot(torch.zeros(1, 1, dtype=torch.float32), pos)
    ours = rope_table(128, 5e6, 32768, "cpu")[pos[0]]
    assert (ours[:, 0] - cos[0]).abs().max() < 2e-6 and (ours[:, 1] - sin[0]).abs().max() < 2e-6
    # and the fp32 angle rounding is the only error versus exact float64 math
    inv = 1.0 / (5e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    exact = torch.cos(pos[0, -1].double() * inv)
    assert (ours[-1, 0, :64].double() - exact).abs().max() < 5e-3  # |angle error| <= ulp(32767) / 2


def test_logits_beyond_16k_match_transformers_with_chunked_prefill(long_dir):
    from transformers import Qwen2ForCausalLM

    n = 16384 + 600
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 390, (n,), generator=g).tolist()
    ref_model = Qwen2ForCausalLM.from_pretrained(long_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        hidden = ref_model.model(torch.tensor([ids])).last_hidden_state[0, 16384:]
        ref = ref_model.lm_head(hidden).float()
    lm = load(EngineConfig(model=str(long_dir), dtype="float32"), progress=False)
    ours = full_logits(lm.model, ids, chunk=4096)[16384:]
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, err


def test_engine_chunked_long_prompt_greedy_equals_unchunked(long_dir):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 390, (9000,), generator=g).tolist()
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.0, logprobs=0)
    outs = []
    for budget in (512, 16384):
        llm = LLM(str(long_dir), dtype="float32", max_model_len=10000, kv_cache_memory=0.05,
                  max_num_batched_tokens=budget)
        outs.append(llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0].outputs[0])
    assert outs[0].token_ids == outs[1].token_ids
    for a, b in zip(outs[0].logprobs, outs[1].logprobs):
        assert all(abs(a[k] - b[k]) <= 1e-4 for k in a)


@pytest.mark.parametrize("kv", ["int8"])
def test_int8_kv_cache_within_bound(tiny_dir, kv):
    """int8 KV (per token and head absmax scales): last-token logits within 2% relative L2 of the
    model-dtype cache, and greedy continuations of 24 tokens agree on all prompts but near-ties."""
    ref = LLM(str(tiny_dir), dtype="float32", max_model_len=512, kv_cache_memory=0.02)
    q = LLM(str(tiny_dir), dtype="float32", max_model_len=512, kv_cache_memory=0.02, kv_cache_dtype=kv)
    assert q.engine.cache.data.dtype == torch.int8
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 390, (int(n),), generator=g).tolist() for n in (5, 40, 130, 300)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.0, logprobs=5)
    a = ref.generate(prompt_token_ids=prompts, sampling_params=sp)
    b = q.generate(prompt_token_ids=prompts, sampling_params=sp)
    for x, y in zip(a, b):
        la, lb = x.outputs[0].logprobs[0], y.outputs[0].logprobs[0]
        first = x.outputs[0].token_ids[0]
        assert abs(la[first] - lb.get(first, la[first] + 1)) < 0.05
        ta, tb = x.outputs[0].token_ids, y.outputs[0].token_ids
        if ta != tb:  # a divergence must start at a near-tie of the reference
            i = next(k for k in range(len(ta)) if ta[k] != tb[k])
            top = sorted(x.outputs[0].logprobs[i].values(), reverse=True)
            assert top[0] - top[1] < 0.1, (i, top[:2])


def test_kv_storage_halves_with_int8(tiny_dir):
    from qwenrun.engine.kv_cache import bytes_per_token

    fp = bytes_per_token(40, 20, 128, torch.bfloat16)
    i8 = bytes_per_token(40, 20, 128, torch.int8)
    assert fp == 409_600  # Qwen1.5-4B: 400 KiB per token in bf16 (spec §1.1)
    assert i8 == 204_800 + 40 * 2 * 20 * (128 // 32) * 4  # int8 + one fp32 scale per 32 channels


def test_plan_refuses_a_context_that_cannot_fit(tiny_dir):
    with pytest.raises(ValueError, match=r"1000-token context needs .* GiB of KV cache"):
        LLM(str(tiny_dir), max_model_len=1000, kv_cache_memory=100 * 512 / 2**30)
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        LLM(str(tiny_dir), max_model_len=4096)


def test_plan_reports_one_line(tiny_dir):
    llm = LLM(str(tiny_dir), max_model_len=512, kv_cache_memory=0.01)
    rep = llm.engine.plan.report()
    assert rep.startswith("KV pool: ") and "tokens = " in rep and rep.endswith("max context 512")


@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(4, 2, 16, None), (6, 6, 64, None), (8, 2, 128, 5)])
def test_int8_kv_fused_decode_attention_equals_dequantize_then_sdpa(heads, kv_heads, head_dim, window):
    """The AVX2 decode kernel over the int8 cache (no dequantized copy) against the reference
    path: gather + dequantize + SDPA, batched with padding and scattered slots."""
    import torch.nn.functional as F

    from qwenrun.engine.kv_cache import KVCache
    from qwenrun.quant import kernels

    if kernels.ops() is None:
        pytest.fail(f"kernels unavailable: {kernels.unavailable_reason()}")  # this machine builds them
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, 64, 4, kv_heads, head_dim, torch.int8, "cpu")
    lens = torch.tensor([1, 37, 100])
    slots = torch.stack([torch.randperm(256, generator=g)[:100] for _ in lens])  # [B, 100]; past lens: padding
    k = torch.randn(256, kv_heads, head_dim, generator=g) * 3
    v = torch.randn(256, kv_heads, head_dim, generator=g)
    cache.write(0, torch.arange(256), k, v)
    q = torch.randn(3, heads, head_dim, generator=g)
    fused = cache.decode_attention(0, q, slots, lens, window, head_dim ** -0.5)
    kd, vd = cache.read(0, slots, torch.float32)
    j = torch.arange(100)[None, :]
    mask = j < lens[:, None]
    if window is not None:
        mask &= j > lens[:, None] - 1 - window
    ref = F.scaled_dot_product_attention(q[:, :, None], kd.transpose(1, 2), vd.transpose(1, 2),
                                         attn_mask=mask[:, None, None], scale=head_dim ** -0.5,
                                         enable_gqa=heads != kv_heads)[:, :, 0]
    assert (fused - ref).abs().max().item() < 1e-5
    cache._fused_ops = None  # the fallback answers None: callers take the gather + SDPA path
    assert cache.decode_attention(0, q, slots, lens, window, 1.0) is None
