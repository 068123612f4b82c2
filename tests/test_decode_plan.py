"""The one-call decode step (csrc/fused_ops.cpp DecodePlan, used by qwen2._forward_fused when every
linear has a kernel: GGUF block weights, int8, int4) against the per-layer fused loop it replaces:
bit-identical logits and cache contents, step by step, for K-quant and Q8_0 files (q/k/v stacked
or separate, gate/up stacked or separate) and int8 / int4 requantized checkpoints, MHA and GQA,
sliding-window layers, fp32 and bf16 activations, fp32 and fp16 caches, one sequence and batches; then when it must not be used, and the kernels' embedding
lookup (bq_dequant_ids) against gguf's dequantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.engine.kv_cache import KVCache
from qwenrun.layers import fused
from qwenrun.layers.attention import AttentionMetadata, DecodeGroup, PrefillSpan
from qwenrun.loader import load
from qwenrun.quant import kernels
from qwenrun.quant.gguf_linear import GGUFEmbedding, dequantize, pack
from test_gguf_native import SHAPES, _kquant_gguf, gguf_blocks
from tiny import write_tiny_checkpoint

OPS = fused.ops()
# Skipped only where no kernel can run (a CPU without AVX2/FMA/F16C); on any other CPU a kernel
# build that failed makes these tests fail, not skip.
needs_plan = pytest.mark.skipif(not kernels.cpu_supported(), reason="this CPU has no AVX2: no kernel can run")
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"

KQ = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
      "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}  # like a Q4_K_M file: q/k/v not stackable
MIXED_MLP = {"ffn_gate": "Q4_K", "ffn_up": "Q6_K"}  # gate and up of different layouts: two linears


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    out = {}
    src = write_tiny_checkpoint(d / "kq", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=True)
    out["kquant-gqa"] = _kquant_gguf(src, d / "kq.gguf", KQ)
    src = write_tiny_checkpoint(d / "q8", hidden=256, intermediate=512, heads=4, kv_heads=4, head_dim=64)
    out["q8-mha"] = _kquant_gguf(src, d / "q8.gguf", {})
    src = write_tiny_checkpoint(d / "sw", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3,
                                use_sliding_window=True, sliding_window=8, max_window_layers=1)
    out["window-mixed-mlp"] = _kquant_gguf(src, d / "sw.gguf", MIXED_MLP)
    # safetensors checkpoints requantized to int8 / int4 (odd sizes: padded rows of K)
    out["hf"] = write_tiny_checkpoint(d / "hf", hidden=96, intermediate=160, heads=4, kv_heads=2, head_dim=32)
    return out


def _load(files, name, dtype):
    if name in ("int8", "int4"):
        from qwenrun.quant import quantizer_for

        cfg = EngineConfig(model=str(files["hf"]), dtype=dtype, quantization=name)
        return load(cfg, progress=False, on_linear=quantizer_for(cfg))
    return load(EngineConfig(model=str(files[name]), dtype=dtype), progress=False)


def _steps(model, ids: list[int], decode: int, kv_dtype, forced: list[int] | None = None):
    """Prefill ``ids``, then ``decode`` one-token steps (greedy, or the ``forced`` tokens) over a
    paged cache with scattered blocks. Returns (logits of every decode step, tokens fed, cache)."""
    cfg = model.config
    bs, total = 4, len(ids) + decode
    nblk = total // bs + 1
    cache = KVCache(cfg.num_hidden_layers, 2 * nblk + 2, bs, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, "cpu")
    cache.data.zero_()  # unwritten slots compare equal below
    table = [2 * i + 1 for i in range(nblk)]  # every other block: the slots are not one run

    def slots(a, b):
        return torch.tensor([table[p // bs] * bs + p % bs for p in range(a, b)])

    out, fed = [], []
    with torch.inference_mode():
        meta = AttentionMetadata(slot_mapping=slots(0, len(ids)))
        meta.prefills.append(PrefillSpan(0, len(ids), len(ids), None))
        lg = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), meta, cache))
        for i in range(decode):
            fed.append(forced[i] if forced is not None else int(lg[-1].argmax()))
            p = len(ids) + i
            meta = AttentionMetadata(slot_mapping=slots(p, p + 1), num_decode=1)
            meta.decode_groups.append(DecodeGroup(0, 1, slots(0, p + 1)[None], torch.tensor([p + 1])))
            lg = model.compute_logits(model(torch.tensor([fed[-1]]), torch.tensor([p]), meta, cache))
            out.append(lg)
    return torch.cat(out), fed, cache


def _plan_ran(model) -> bool:
    got = model.__dict__.get("_plan")
    return got is not None and got[0].seconds()["linears"] > 0


@needs_plan
@pytest.mark.parametrize("name", ["kquant-gqa", "q8-mha", "window-mixed-mlp", "int8", "int4"])
@pytest.mark.parametrize("dtype,kv", [("float32", torch.float32), ("float32", torch.float16),
                                      ("bfloat16", torch.bfloat16)])
def test_plan_is_bit_identical_to_the_layer_loop(files, name, dtype, kv):
    lm = _load(files, name, dtype)
    m = lm.model
    kind = {"int8": "int8", "int4": "int4"}.get(name, "gguf")
    assert all(mod.fmt == kind for n, mod in m.named_modules() if n.endswith("_proj"))
    layer0 = m.model.layers[0]
    if name == "kquant-gqa":  # q/k (Q4_K) and v (Q6_K) stay three linears; gate/up are stacked
        assert layer0.self_attn.qkv_proj is None and layer0.mlp.gate_up_proj is not None
    if name == "window-mixed-mlp":
        assert layer0.mlp.gate_up_proj is None
        for layer in m.model.layers[1:]:  # GGUF keeps no sliding window: set as the HF config says
            layer.self_attn.window = 8
    ids = lm.tokenizer.encode(PROMPT)
    with fused.no_plan():
        ref, toks, ref_cache = _steps(m, ids, 10, kv)
    assert m.__dict__.get("_plan") is None
    got, _, cache = _steps(m, ids, 10, kv, forced=toks)
    assert _plan_ran(m)
    assert torch.equal(got, ref)
    assert torch.equal(cache.data, ref_cache.data)  # RoPE'd keys and values written alike


@needs_plan
@pytest.mark.parametrize("name,tiles", [("kquant-gqa", False), ("window-mixed-mlp", False), ("kquant-gqa", True)])
def test_batched_decode_through_the_engine(files, name, tiles):
    """LLM.generate with 3 sequences decoding together (a [B, L] slot table): the same tokens and
    the same logprobs, to the bit, as the layer loop. tiles: the linears take the many-row path
    from 1 row on in both (AMX tiles, or their emulation, where the build has them; else this
    case runs the GEMV again)."""
    from qwenrun.quant import kernels as K

    ops = K.ops()
    default = ops.bq_tiles_min_rows()
    if tiles and ops.bq_tiles():
        ops.bq_tiles(1)
    try:
        _batched_decode(files, name)
    finally:
        if default > 0:
            ops.bq_tiles(default)


def _batched_decode(files, name):
    llm = LLM(str(files[name]), kv_cache_memory=0.02, block_size=4)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(PROMPT), tok.encode("Hello world!"), tok.encode(PROMPT[::-1])]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    got = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    model = llm.engine.loaded.model
    assert _plan_ran(model)
    llm.engine.block_manager.reset_prefix_cache()
    with fused.no_plan():
        ref = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        assert g.logprobs == r.logprobs


@needs_plan
@pytest.mark.parametrize("quantization", ["auto", "int4"])
def test_demo_greedy_tokens_and_logprobs_identical(quantization):
    llm = LLM("demo", kv_cache_memory=0.25, max_model_len=512, quantization=quantization)
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    got = llm.generate([prompt], sp)[0].outputs[0]
    assert _plan_ran(llm.engine.loaded.model)
    llm.engine.block_manager.reset_prefix_cache()
    with fused.no_plan():
        ref = llm.generate([prompt], sp)[0].outputs[0]
    assert got.token_ids == ref.token_ids
    assert got.logprobs == ref.logprobs


@needs_plan
def test_plan_not_used_or_rebuilt_when_the_model_changes(files):
    lm = load(EngineConfig(model=str(files["q8-mha"])), progress=False)
    m = lm.model
    ids = lm.tokenizer.encode(PROMPT)
    ref, toks, _ = _steps(m, ids, 3, torch.float32)
    first = m.__dict__["_plan"][0]
    _steps(m, ids, 3, torch.float32, forced=toks)
    assert m.__dict__["_plan"][0] is first  # kept between steps
    down = m.model.layers[1].mlp.down_proj
    # a linear off its kernel (the exact PyTorch path): the layer loop runs
    down.use_kernel = False
    first.reset_seconds()
    _steps(m, ids, 3, torch.float32, forced=toks)
    assert m.__dict__["_plan"] is None and first.seconds()["linears"] == 0
    down.use_kernel = True
    # an instance-level forward (as benchmarks install to time the linears) is honoured
    calls = []
    down.forward = lambda x, _f=down.forward: calls.append(1) or _f(x)
    got, _, _ = _steps(m, ids, 3, torch.float32, forced=toks)
    assert calls and torch.equal(got, ref)
    del down.forward
    # a replaced norm weight is seen: the plan is rebuilt with it
    _steps(m, ids, 3, torch.float32, forced=toks)
    plan = m.__dict__["_plan"][0]
    norm = m.model.layers[0].post_attention_layernorm
    norm.weight = torch.nn.Parameter(norm.weight * 2, requires_grad=False)
    with fused.no_plan():
        ref2, _, _ = _steps(m, ids, 3, torch.float32, forced=toks)
    got2, _, _ = _steps(m, ids, 3, torch.float32, forced=toks)
    assert m.__dict__["_plan"][0] is not plan and torch.equal(got2, ref2) and not torch.equal(got2, ref)


@needs_plan
def test_plan_off_by_environment(files, monkeypatch):
    lm = load(EngineConfig(model=str(files["q8-mha"])), progress=False)
    ids = lm.tokenizer.encode(PROMPT)
    monkeypatch.setenv("QWENRUN_NO_DECODE_PLAN", "1")
    off, toks, _ = _steps(lm.model, ids, 3, torch.float32)
    assert lm.model.__dict__.get("_plan") is None
    monkeypatch.setenv("QWENRUN_NO_DECODE_PLAN", "0")
    on, _, _ = _steps(lm.model, ids, 3, torch.float32, forced=toks)
    assert _plan_ran(lm.model) and torch.equal(on, off)


@needs_plan
def test_plan_rejects_bad_arguments(files):
    lm = load(EngineConfig(model=str(files["q8-mha"])), progress=False)
    m = lm.model
    ids = lm.tokenizer.encode(PROMPT)
    _steps(m, ids, 1, torch.float32)
    plan = m.__dict__["_plan"][0]
    cfg = m.config
    cache = KVCache(cfg.num_hidden_layers, 4, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    h = torch.zeros(1, cfg.hidden_size)
    one, none = torch.tensor([1]), torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="outside the table"):
        plan.run(h, m.rope, torch.tensor([10 ** 6]), cache.data, one, none, 0, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="out of range"):
        plan.run(h, m.rope, one, cache.data, torch.tensor([999]), none, 0, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="h \\[B, D\\]"):
        plan.run(torch.zeros(1, 7), m.rope, one, cache.data, one, none, 0, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="a GGUF linear has 11"):
        OPS.DecodePlan([([("gguf", 8, ())], (), [()], (), h[0], h[0], 0, 0, 1.0)], h[0], 1e-6, 4, 4, 64)
    with pytest.raises(RuntimeError, match="no kernel for linear format 'fp8'"):
        OPS.DecodePlan([([("fp8", 8, ())], (), [()], (), h[0], h[0], 0, 0, 1.0)], h[0], 1e-6, 4, 4, 64)


@needs_plan
@pytest.mark.parametrize("qtype", sorted(SHAPES))
def test_embedding_lookup_kernel_equals_gguf_dequantization(qtype):
    import gguf

    O, K = SHAPES[qtype][0]
    blocks = gguf_blocks(qtype, O, K, seed=3)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)).copy()).view(O, K)
    w = pack(qtype, blocks, (O, K))
    ids = torch.tensor([O - 1, 0, 2, 2])
    for dtype in (torch.float32, torch.bfloat16):
        emb = GGUFEmbedding(w, dtype)
        assert emb.use_kernel
        got = emb(ids.view(2, 2))
        assert got.shape == (2, 2, K) and torch.equal(got.view(4, K), ref[ids].to(dtype))
        emb.use_kernel = False
        assert torch.equal(emb(ids.view(2, 2)), got)
        assert torch.equal(dequantize(w, dtype=dtype)[ids], got.view(4, K))
    with pytest.raises(RuntimeError, match="out of range"):
        GGUFEmbedding(w, torch.float32)(torch.tensor([O]))
    assert np.isfinite(ref.numpy()).all()
