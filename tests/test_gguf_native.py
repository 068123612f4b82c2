"""GGUF block formats at their own precision (quantization="auto"): the weights qwenrun multiplies
by are exactly gguf's dequantization of the file, for every format, in every code path; the GEMV
kernel equals an fp64 simulation of its arithmetic; models in auto mode stay close to the dense
dequantized model (same file, same values: only the kernels' int8 activations differ).

Blocks are written in-test: gguf's own quantizer for the formats it has (Q8_0, Q4_0, Q5_0, Q4_1,
Q5_1), random bytes with sane scales for the K-quants (every bit pattern is a valid block), and
the demo file's own tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.loader import load
from qwenrun.quant import kernels
from qwenrun.quant.gguf_linear import NATIVE_TYPES, GGUFLinear, dequantize, pack
from test_quant import rel, simulate_kernel

OPS = kernels.ops()
# (O, K) pairs: odd row counts; K a multiple of each format's block (K-quants: 256); 96 keeps a
# 4-bit format in int8 storage (not a multiple of 64); 896 and 960 end with a half group (+ a plain rest).
SHAPES = {"Q8_0": [(7, 96), (33, 2560), (5, 960)], "Q5_0": [(5, 896), (33, 64), (3, 960)], "Q5_1": [(3, 320)],
          "Q4_0": [(9, 96), (17, 896)], "Q4_1": [(3, 96), (5, 2560)], "Q4_K": [(7, 256), (33, 2560)],
          "Q5_K": [(5, 512)], "Q6_K": [(9, 256), (17, 4864)]}


def gguf_blocks(qtype: str, O: int, K: int, seed: int = 0) -> np.ndarray:
    """Raw bytes of an [O, K] tensor in ``qtype`` with weights of a plausible size."""
    import gguf

    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        w = rng.standard_normal((O, K)).astype(np.float32) * 0.05
        w[0, :7] = [0.3, -0.3, 0, 1e-8, -1e-8, 0.2, -0.21]  # extremes and near-zeros in one block
        return gguf.quants.quantize(w, qt)
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, size=(O, K // block, tsize), dtype=np.uint8)

    def f16(lo, hi):
        return rng.uniform(lo, hi, size=(O, K // block, 1)).astype(np.float16).view(np.uint8)

    if qtype in ("Q4_K", "Q5_K"):  # d, dmin then 6-bit scales/mins: centre the weights near 0
        d = rng.uniform(5e-5, 2e-4, size=(O, K // block, 1)).astype(np.float16)
        mean_q = 7.5 if qtype == "Q4_K" else 15.5
        b[..., 0:2] = d.view(np.uint8)
        b[..., 2:4] = (d.astype(np.float32) * mean_q).astype(np.float16).view(np.uint8)
    else:  # Q6_K: ... int8 scales, fp16 d last
        b[..., 208:210] = f16(2e-6, 1e-5)
    return b.reshape(O, -1)


def reference(qtype: str, raw: np.ndarray, O: int, K: int) -> torch.Tensor:
    import gguf

    arr = gguf.quants.dequantize(raw.reshape(O, -1), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(O, K))


CASES = [(qt, O, K) for qt in NATIVE_TYPES for O, K in SHAPES[qt]]


def kernel_cases(seed: int):
    """(qtype, O, K, packed weight) for each of CASES the kernels take (blocks from ``seed``)."""
    for qtype, O, K in CASES:
        w = pack(qtype, gguf_blocks(qtype, O, K, seed=seed), (O, K))
        if w.kernel_ok:
            yield qtype, O, K, w


@pytest.mark.parametrize("qtype,O,K", CASES)
def test_weights_equal_gguf_dequantization_exactly(qtype, O, K):
    raw = gguf_blocks(qtype, O, K)
    ref = reference(qtype, raw, O, K)
    w = pack(qtype, raw, (O, K))
    assert torch.equal(dequantize(w), ref)  # the PyTorch path (CUDA, no kernels)
    assert torch.equal(dequantize(w, 1, O - 1), ref[1:O - 1])
    assert torch.equal(dequantize(w, dtype=torch.bfloat16), ref.to(torch.bfloat16))
    if OPS is not None:  # the C++ tile dequantizer the many-row path multiplies with
        out = torch.empty(O - 1, K)
        got = OPS.bq_dequant(*w.kernel_args(), 1, O, out)
        assert torch.equal(got, ref[1:])
        out16 = torch.empty(O, K, dtype=torch.bfloat16)
        assert torch.equal(OPS.bq_dequant(*w.kernel_args(), 0, O, out16),
                           ref.to(torch.bfloat16))
    # storage at the file's size: bit planes for 4/5/6-bit formats whenever rows are a multiple of 64
    assert w.bits == (8 if qtype == "Q8_0" or K % 64 else int(qtype[1])), w.bits
    bytes_per_weight = sum(t.numel() * t.element_size() for t in w.buffers().values() if t is not None) / (O * K)
    bound = {"Q4_K": 0.6, "Q4_0": 0.8, "Q4_1": 0.8, "Q5_0": 0.8, "Q5_1": 0.8, "Q5_K": 0.71, "Q6_K": 0.83}
    assert bytes_per_weight <= bound.get(qtype if w.nib else "", 1.3), bytes_per_weight


@pytest.mark.parametrize("qtype,O,K", CASES)
def test_cpp_repacking_equals_the_torch_repacking(qtype, O, K):
    """The load-time C++ repackers (Q8_0, Q4_K, Q5_0/Q5_1, Q6_K) give exactly the torch path's bytes
    (the 5-bit shapes cover full groups, a half group and a plain rest: 896, 960, 320, 64)."""
    raw = gguf_blocks(qtype, O, K, seed=5)
    a, b = pack(qtype, raw, (O, K)), pack(qtype, raw, (O, K), use_kernels=False)
    for name, t in a.buffers().items():
        u = b.buffers()[name]
        assert (t is None) == (u is None) and (t is None or torch.equal(t, u)), name
    assert (a.bits, a.zp, a.G, a.S) == (b.bits, b.zp, b.G, b.S)


@pytest.mark.parametrize("qtype,O,K", CASES)
def test_kernel_equals_simulation_of_its_arithmetic(qtype, O, K):
    """The integer GEMV (N = 1..17 rows: 1-4 rows per unpacked chunk, the many-row blocking) equals fp64 products of the exact weights with the
    activations quantized to int8 per 32, up to fp32 accumulation."""
    raw = gguf_blocks(qtype, O, K, seed=1)
    w = pack(qtype, raw, (O, K))
    ref_w = reference(qtype, raw, O, K)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(O, generator=g)
    lin = GGUFLinear(w, bias)
    for N in (1, 2, 3, 4, 5, 9, 17):
        x = torch.randn(N, K, generator=g)
        if OPS is None or not w.kernel_ok:
            ref = x.double() @ ref_w.double().T + bias.double()
            y = lin(x)
        else:
            ref = simulate_kernel(x, ref_w, 32) + bias.double()
            y = OPS.bq_linear(x, *w.kernel_args(), lin.bias)
            if N <= lin.max_kernel_rows:
                assert torch.equal(lin(x), y)  # the module's decode path is this kernel
        assert y.shape == (N, O) and rel(y, ref) < 2e-6, (qtype, N, rel(y, ref))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q5_0"])
def test_many_rows_and_fallback_paths_multiply_the_exact_weights(qtype, monkeypatch):
    O, K = SHAPES[qtype][-1]
    raw = gguf_blocks(qtype, O, K, seed=3)
    ref_w = reference(qtype, raw, O, K)
    lin = GGUFLinear(pack(qtype, raw, (O, K)))
    lin.max_kernel_rows = 8  # (fp32 takes the kernel at any size; bf16 on AMX CPUs the tiles)
    x = torch.randn(80, K, generator=torch.Generator().manual_seed(4))
    assert x.shape[0] > lin.max_kernel_rows  # the tiles path
    exact = x.double() @ ref_w.double().T
    assert rel(lin(x), exact) < 1e-6  # tiles dequantized exactly, fp32 GEMM
    lin.use_kernel = False  # the pure-PyTorch path
    assert rel(lin(x[:3]), exact[:3]) < 1e-6
    assert rel(lin(x.view(5, 16, K)).view(80, O), exact) < 1e-6


def test_q8_0_minus_128_takes_the_exact_path():
    """GGUF Q8_0 can hold -128, which the sign trick cannot: such a tensor multiplies exactly
    on the dequantizing path instead of the integer kernel."""
    import gguf

    O, K = 4, 64
    b = gguf_blocks("Q8_0", O, K).reshape(O, K // 32, 34).copy()
    b[1, 0, 2] = 0x80  # q = -128
    raw = b.reshape(O, -1)
    w = pack("Q8_0", raw, (O, K))
    assert not w.kernel_ok
    lin = GGUFLinear(w)
    assert not lin.use_kernel
    x = torch.randn(1, K)
    ref = x.double() @ reference("Q8_0", raw, O, K).double().T
    assert rel(lin(x), ref) < 1e-6
    assert gguf.GGMLQuantizationType.Q8_0  # (the reference reads the same bytes)
    if w.rows_m128 is not None:  # kernel builds: found per row by the repacker, in the same pass
        assert w.rows_m128.tolist() == [False, True, False, False]
    # inside an interleaved group (K = 288: 8 blocks permuted, then one plain block), and in the plain rest
    O, K = 3, 288
    clean = gguf_blocks("Q8_0", O, K, 11).reshape(O, K // 32, 34).copy()
    assert pack("Q8_0", clean.reshape(O, -1), (O, K)).kernel_ok
    for row, blk, pos in ((2, 5, 17), (0, 8, 31)):
        b = clean.copy()
        b[row, blk, 2 + pos] = 0x80
        w = pack("Q8_0", b.reshape(O, -1), (O, K))
        assert not w.kernel_ok and not GGUFLinear(w).use_kernel
        if w.rows_m128 is not None:
            assert w.rows_m128.tolist() == [r == row for r in range(O)]


def test_concat_stacks_only_matching_layouts():
    a = GGUFLinear(pack("Q5_0", gguf_blocks("Q5_0", 8, 96, 5), (8, 96)), torch.randn(8))  # int8 storage
    b = GGUFLinear(pack("Q8_0", gguf_blocks("Q8_0", 4, 96, 6), (4, 96)))
    c = GGUFLinear(pack("Q4_0", gguf_blocks("Q4_0", 4, 64, 7), (4, 64)))
    d = GGUFLinear(pack("Q5_0", gguf_blocks("Q5_0", 4, 64, 8), (4, 64)), torch.randn(4))  # bit planes
    e = GGUFLinear(pack("Q5_1", gguf_blocks("Q5_1", 4, 64, 9), (4, 64)))
    x = torch.randn(2, 96)
    fused = GGUFLinear.concat([a, b])  # same storage and geometry: rows stack
    assert fused is not None and fused.qtype == "Q5_0+Q8_0"
    assert torch.equal(fused(x), torch.cat([a(x), b(x)], -1))
    x = torch.randn(2, 64)
    fused = GGUFLinear.concat([d, e])  # both nibbles + high-bit words + offsets
    assert fused.qtype == "Q5_0+Q5_1" and fused.qh is not None
    assert torch.equal(fused(x), torch.cat([d(x), e(x)], -1))
    assert torch.equal(fused.dequantize(), torch.cat([d.dequantize(), e.dequantize()]))
    for pair in ([c, d], [a, d]):  # nibbles vs nibbles + plane, bytes vs planes: kept separate
        with pytest.raises(ValueError):
            GGUFLinear.concat(pair)


# -- models -------------------------------------------------------------------------------------
def _kquant_gguf(src_dir, dst, types: dict[str, str]):
    """A tiny GGUF whose 2-D tensors are block formats: types maps a name fragment → format."""
    import gguf
    from test_gguf import write_gguf

    def quantize(arr: np.ndarray, qt):
        name = gguf.GGMLQuantizationType(qt).name
        return gguf_blocks(name, arr.shape[0], arr.shape[1], seed=arr.shape[0] * 7 + arr.shape[1])

    return write_gguf(src_dir, dst, "Q8_0", quantizer=quantize, types=types)


@pytest.fixture(scope="module")
def tiny_kq(tmp_path_factory):
    """Tied embeddings, K-quant shapes (hidden 256, MLP 512), mixed formats like a Q4_K_M file."""
    from tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny-kq")
    src = write_tiny_checkpoint(d / "hf", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=True)
    return _kquant_gguf(src, d / "tiny-kq.gguf", {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K",
                                                  "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
                                                  "ffn_up": "Q4_K", "ffn_down": "Q6_K"})


def test_tiny_kquant_model_auto_matches_dense_dequantization(tiny_kq):
    from test_model_parity import PROMPT, full_logits

    auto = load(EngineConfig(model=str(tiny_kq)), progress=False)
    dense = load(EngineConfig(model=str(tiny_kq), quantization="none"), progress=False)
    assert auto.quantization == "gguf:Q4_K,Q5_K,Q6_K" and dense.quantization is None
    m = auto.model
    assert isinstance(m.lm_head, GGUFLinear) and m.lm_head.q is m.model.embed_tokens.q  # tied: one table
    assert auto.weight_bytes < dense.weight_bytes / 3.5
    checked = 0
    for name, mod in dense.model.named_modules():  # every weight equals the dense dequantization
        if name.endswith(("o_proj", "gate_up_proj", "down_proj")):  # gate/up: both Q4_K, stacked
            assert torch.equal(m.get_submodule(name).dequantize(), mod.weight), name
            checked += 1
    assert checked == 3 * auto.config.num_hidden_layers
    assert torch.equal(m.lm_head.dequantize(), dense.model.lm_head.weight)
    ids = auto.tokenizer.encode(PROMPT)
    a, b = full_logits(auto.model, ids), full_logits(dense.model, ids)
    assert ((a - b).norm() / b.norm()).item() < 0.02  # int8 activations in the kernels only
    emb_ids = torch.tensor([0, 5, 5, 17])
    assert torch.equal(m.model.embed_tokens(emb_ids), dense.model.model.embed_tokens(emb_ids))


# Multiple-choice items scored by log-likelihood of each option after the question.
MC = [("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"]),
      ("2 + 2 =", [" 4", " 5", " 22", " 3"]),
      ("The opposite of hot is", [" cold", " warm", " loud", " blue"]),
      ("Water freezes at 0 degrees", [" Celsius", " Kelvin", " meters", " seconds"]),
      ("In Python, a function is defined with the keyword", [" def", " func", " function", " lambda"]),
      ("The largest planet in the solar system is", [" Jupiter", " Mars", " Venus", " Mercury"]),
      ("A week has seven", [" days", " hours", " months", " years"]),
      ("The chemical symbol for gold is", [" Au", " Ag", " Fe", " Go"]),
      ("SELECT * FROM users WHERE id", [" =", " +", " (", " ;"]),
      ("The sun rises in the", [" east", " west", " north", " south"]),
      ("def add(a, b):\n    return a", [" + b", " - b", " * b", " / b"]),
      ("Le ciel est", [" bleu", " rouge", " vert", " noir"])]


def _mc_scores(llm: LLM) -> list[list[float]]:
    """Summed log-probability of each option's tokens after its question (one batched call)."""
    tok = llm.get_tokenizer()
    prompts = [tok.encode(q + o) for q, options in MC for o in options]
    starts = [len(tok.encode(q)) for q, options in MC for _ in options]
    res = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))
    flat = [sum(d[t] for d, t in zip(r.prompt_logprobs[n:], ids[n:])) for r, ids, n in zip(res, prompts, starts)]
    return [flat[i:i + 4] for i in range(0, len(flat), 4)]


def test_demo_auto_runs_the_file_precision_close_to_dense(demo_path):
    """The demo GGUF in auto mode: each of its formats (Q5_0, Q8_0, Q4_K, Q6_K) used as stored,
    no dense copy (weights ~3.9x smaller than fp32), logits within a stated bound of the dense
    dequantized model, identical picks on a multiple-choice task scored by log-likelihood."""
    dense = LLM(str(demo_path), quantization="none", kv_cache_memory=0.25, max_model_len=2048)
    auto = LLM(str(demo_path), kv_cache_memory=0.25, max_model_len=2048)  # the default is auto
    la, ld = auto.engine.loaded, dense.engine.loaded
    assert la.quantization == "gguf:Q4_K,Q5_0,Q6_K,Q8_0"
    assert la.weight_bytes < ld.weight_bytes / 3.5
    sa, sd = _mc_scores(auto), _mc_scores(dense)
    picks_a = [int(np.argmax(s)) for s in sa]
    assert picks_a == [int(np.argmax(s)) for s in sd]
    assert sum(p == 0 for p in picks_a) >= 10  # the task is answerable by the model
    worst = max(abs(x - y) for a, b in zip(sa, sd) for x, y in zip(a, b))
    print(f"max |log-likelihood difference| auto vs dense: {worst:.4f} nats")
    assert worst < 0.5, worst  # nats; the kernels' int8 activations (per 32) are the only difference
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = auto.chat(msgs, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    assert "Paris" in text


def test_auto_keeps_safetensors_dense_and_other_formats_only_when_asked(tiny_dir, tiny_kq):
    from qwenrun.quant.linear import Int8Linear

    st = load(EngineConfig(model=str(tiny_dir)), progress=False)  # auto on safetensors: dense
    def up(lm):  # gate/up are stacked after loading unless the weights are used from the file in place
        mlp = lm.model.model.layers[0].mlp
        return mlp.gate_up_proj if mlp.gate_up_proj is not None else mlp.up_proj

    assert st.quantization is None and type(up(st)) is torch.nn.Linear
    from qwenrun.quant import quantizer_for

    cfg = EngineConfig(model=str(tiny_kq), quantization="int8")
    asked = load(cfg, progress=False, on_linear=quantizer_for(cfg))  # a second rounding, asked for
    assert asked.quantization == "int8" and isinstance(up(asked), Int8Linear)
    assert EngineConfig(model="x", quantization="none").quantization is None
    with pytest.raises(ValueError, match="auto"):
        EngineConfig(model="x", quantization="q4_k")


def test_gguf_auto_keeps_fp32_activations_where_bf16_is_native(monkeypatch, demo_path):
    """On an AMX / AVX512-BF16 CPU int8/int4 get bf16 activations, but a GGUF at its own precision
    stays fp32 (bf16 GEMM tiles would round the file's dequantized weights a second time)."""
    import qwenrun.loader as loader
    from qwenrun.loader.gguf import read_gguf

    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: True)
    cfg, cpu = read_gguf(demo_path).config, torch.device("cpu")
    assert loader.pick_dtype("auto", cpu, cfg, "gguf") == torch.float32
    assert loader.pick_dtype("auto", cpu, cfg, "int8") == torch.bfloat16
    assert loader.pick_dtype("bfloat16", cpu, cfg, "gguf") == torch.bfloat16
