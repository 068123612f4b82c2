"""Weight-only int8 / int4: formats, AVX2 kernels vs an exact simulation, the PyTorch fallback,
per-layer error bounds, and whole models (tiny random checkpoint; the real demo model).

The C++ packers and dequantizers are bit-identical to the PyTorch ones. Bounds (relative
Frobenius error unless said otherwise):
* kernel vs an fp64 simulation of its own integer arithmetic: < 1e-5 (fp32 accumulation only);
* fallback vs fp64 dequantized-weight reference: < 1e-5 (it does not quantize activations);
* kernel vs fp64 reference: elementwise within the worst-case activation-quantization bound
  (int8, one scale per 64/128 block: each x moves by <= amax/254), and kernel vs fallback
  < 2e-2 relative (≈ 0.3-0.6% on Gaussian inputs);
* quantized vs dense layer on Gaussian weights: int8 < 1% (< 1.5% with the kernel's int8
  activations), int4 < 10% (measured 0.65% / 0.85-1.05% / 7.1%).
When the kernels can't be built here, the kernel tests run the fallback path instead."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenrun.quant import kernels
from qwenrun.quant.linear import (INT4_SB, INT8_BLOCK, Int4Linear, Int8Linear, dequantize_int4,
                                  dequantize_int8, make_quantizer, quantize_int4, quantize_int8)

KS, OS, NS = (33, 100, 896, 2560), (1, 7, 129, 4864), (1, 2, 3, 17, 40, 50)
CLASSES = {"int8": Int8Linear, "int4": Int4Linear}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def simulate_kernel(x: torch.Tensor, w_deq: torch.Tensor, block: int) -> torch.Tensor:
    """The kernel's arithmetic in fp64: x quantized per `block` to int8 (scale amax/127, q =
    round-half-even(x * (127/amax)) in fp32), then exact products with the dequantized weight."""
    N, K = x.shape
    kp = -(-K // block) * block
    xb = torch.nn.functional.pad(x.float(), (0, kp - K)).view(N, kp // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax  # a true fp32 division (127.0 / t is reciprocal * 127)
    q = torch.where(amax > 0, xb * inv, 0.0).round()  # fp32 ops, like the C++ code
    xd = (q.double() * (amax.double() / 127.0)).view(N, kp)[:, :K]
    return xd @ w_deq.double().T


@pytest.fixture(scope="module")
def ops():
    return kernels.ops()


@pytest.fixture(scope="module")
def layers():
    """{(fmt, K, O): (module, dense weight, bias)} over the odd shapes, built once."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for K in KS:
        for O in OS:
            w = torch.randn(O, K, generator=g) * 0.05
            b = torch.randn(O, generator=g) if O % 2 else None  # with and without bias
            for fmt, cls in CLASSES.items():
                out[fmt, K, O] = (cls(w, b), w, b)
    return out


def test_formats_shapes_and_padding():
    w = torch.randn(7, 100)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (7, 128) and (q[:, 100:] == 0).all() and s.shape == (7,)
    q4, sub, d = quantize_int4(w)
    assert q4.dtype == torch.uint8 and q4.shape == (7, 64) and sub.shape == (7, 4) and d.shape == (7, 1)
    assert d.dtype == torch.bfloat16 and sub.abs().max() <= 127
    # worst case: a group's opposite-sign extreme clamps from +8 to +7, one full step
    assert (dequantize_int4(q4, sub, d, 100) - w).abs().max().item() <= w.abs().max().item() / 8 * 1.02
    m = Int4Linear(w)
    assert m.in_features == 100 and m.out_features == 7 and m.weight_bytes == 7 * 64 + 7 * 4 + 7 * 2
    assert Int8Linear(w, torch.zeros(7)).weight_bytes == 7 * 128 + 7 * 4 + 7 * 4


@pytest.mark.parametrize("shape", [(7, 33), (129, 100), (3, 300), (64, 896)])
def test_cpp_packer_matches_torch(shape):
    """The C++ packers (load time) and the PyTorch ones produce identical bytes."""
    w = torch.randn(*shape) * 0.05
    w[0, :5] = 0.0
    w[1 % shape[0]] = 0.0  # an all-zero row: scale 0
    for f in (quantize_int8, quantize_int4):
        a, b = f(w), f(w, use_kernel=False)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f.__name__


def test_int4_group_extreme_is_exact():
    """Each group's largest-magnitude weight maps to nibble level -8 exactly (up to the sub-scale)."""
    w = torch.randn(3, 256)
    deq = dequantize_int4(*quantize_int4(w), 256)
    g, gd = w.view(3, 8, 32), deq.view(3, 8, 32)
    i = g.abs().argmax(-1, keepdim=True)
    assert torch.allclose(g.gather(-1, i), gd.gather(-1, i), rtol=1e-2)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kernel_matches_simulation(fmt, layers, ops):
    """The integer kernel (called directly, every N) equals the fp64 simulation of its arithmetic."""
    g = torch.Generator().manual_seed(1)
    block = INT8_BLOCK if fmt == "int8" else INT4_SB
    for K in KS:
        for O in OS:
            m, w, b = layers[fmt, K, O]
            for N in NS:
                x = torch.randn(N, K, generator=g)
                ref = simulate_kernel(x, m.dequantize(), block) + (0 if b is None else b.double())
                if ops is None:  # no compiler here: the fallback must still match the exact product
                    ref = x.double() @ m.dequantize().double().T + (0 if b is None else b.double())
                    y, bound = m(x), 1e-5
                elif fmt == "int8":
                    y, bound = ops.int8_linear(x, m.qweight, m.scale, m.bias), 1e-5
                else:
                    y, bound = ops.int4_linear(x, m.qweight, m.sub, m.d, m.bias), 1e-5
                assert y.shape == (N, O) and rel(y, ref) < bound, (fmt, K, O, N, rel(y, ref))


def act_quant_bound(x: torch.Tensor, w_deq: torch.Tensor, block: int) -> torch.Tensor:
    """Worst-case |error| per output of quantizing x to int8 per block: each element moves by at
    most half a step (amax_b / 254), so |dy_o| <= sum_b amax_b / 254 * sum_{k in b} |w_ok|."""
    N, K = x.shape
    kp = -(-K // block) * block
    amax = torch.nn.functional.pad(x.double().abs(), (0, kp - K)).view(N, -1, block).amax(-1)  # [N, blocks]
    wabs = torch.nn.functional.pad(w_deq.double().abs(), (0, kp - K)).view(w_deq.shape[0], -1, block).sum(-1)
    return (amax / 254.0) @ wabs.T  # [N, O]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_forward_paths_vs_reference(fmt, layers):
    """Module forward (kernel, or dequantized tiles for N > max_kernel_rows) and the forced
    fallback against the fp64 dequantized reference, and against each other. The kernel path
    stays within the worst-case activation-quantization bound, elementwise."""
    g = torch.Generator().manual_seed(2)
    block = INT8_BLOCK if fmt == "int8" else INT4_SB
    for K in KS:
        for O in OS:
            m, w, b = layers[fmt, K, O]
            wd = m.dequantize().double()
            for N in NS:
                x = torch.randn(N, K, generator=g)
                ref = x.double() @ wd.T + (0 if b is None else b.double())
                y = m(x)
                m.use_kernel = False
                yf = m(x)
                m.use_kernel = True
                assert rel(yf, ref) < 1e-5, ("fallback", fmt, K, O, N, rel(yf, ref))
                if N > m.max_kernel_rows or not m.use_kernel:  # tiles of dequantized weight + sgemm
                    assert rel(y, ref) < 1e-5, ("tiled", fmt, K, O, N, rel(y, ref))
                else:
                    err = (y.double() - ref).abs()
                    assert (err <= act_quant_bound(x, wd, block) * 1.0001 + 1e-5).all(), ("kernel", fmt, K, O, N)
                    assert O < 100 or rel(y, yf) < 2e-2, ("kernel", fmt, K, O, N, rel(y, yf))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("K", [33, 896])
def test_kernel_dequant_matches_torch(fmt, K, layers, ops):
    m = layers[fmt, K, 129][0]
    if ops is None:
        assert torch.equal(m.dequantize(3, 40), m.dequantize()[3:40])
        return
    got = m._kernel_dequant(ops, 3, 40)
    assert torch.equal(got, m.dequantize(3, 40))
    # bf16 tiles (the bf16-activation GEMM path) are the fp32 tile rounded to nearest even,
    # bit for bit, including partial blocks (K = 33, 896 are not multiples of 128)
    got16 = m._kernel_dequant(ops, 3, 40, torch.bfloat16)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, m.dequantize(3, 40).to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kernel_bf16_in_and_out_equals_converting_around_fp32(fmt, layers, ops):
    """bf16 activations go straight into the kernel and come back bf16: bit-identical to
    converting to fp32, running the fp32 kernel and rounding the result (no conversions)."""
    g = torch.Generator().manual_seed(5)
    if ops is None:  # no kernels on this machine: the PyTorch path keeps the dtype contract
        m = layers[fmt, 100, 129][0]
        y = m(torch.randn(3, 100, generator=g).to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (3, 129)
        return
    for K in KS:
        for O in (7, 129):
            m = layers[fmt, K, O][0]
            for N in (1, 3, m.max_kernel_rows_bf16):
                x = torch.randn(N, K, generator=g).to(torch.bfloat16)
                y = m._kernel(ops, x)
                assert y.dtype == torch.bfloat16 and y.shape == (N, O)
                assert torch.equal(y, m._kernel(ops, x.float()).to(torch.bfloat16)), (fmt, K, O, N)
                assert torch.equal(m(x), y)  # the module's decode path is the kernel itself


@pytest.mark.skipif(not kernels.cpu_supported(), reason="this CPU has no AVX2: no kernel can run")
def test_int4_then_int8_calls_share_scratch_safely():
    """In a fresh process (empty per-thread buffers): an int4 call over many rows, then an int8 one
    over fewer. The int4 GEMV grows its quantized-activation buffer but not the int8 GEMV's |x|
    one; sizing both from the first crashed (segfault) before each buffer was checked on its own."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from qwenrun.quant import kernels\n"
        "from qwenrun.quant.linear import Int4Linear, Int8Linear\n"
        "ops = kernels.ops()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w = torch.randn(64, 2560, generator=g) * 0.05\n"
        "a, b = Int4Linear(w, None), Int8Linear(w, None)\n"
        "a._kernel(ops, torch.randn(48, 2560, generator=g))\n"
        "x = torch.randn(20, 2560, generator=g)\n"
        "y = b._kernel(ops, x)\n"
        "ref = x @ b.dequantize().T\n"
        "assert ((y - ref).norm() / ref.norm()).item() < 0.02, (y - ref).norm()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_fallback_forced_by_env(monkeypatch):
    monkeypatch.setenv("QWENRUN_NO_KERNELS", "1")
    assert kernels.ops() is None and "QWENRUN_NO_KERNELS" in kernels.unavailable_reason()
    w, b = torch.randn(129, 896), torch.randn(129)
    for cls in (Int8Linear, Int4Linear):
        m = cls(w, b)  # quantized by the PyTorch packer, run by the PyTorch path
        assert not m.use_kernel
        x = torch.randn(2, 896)
        assert rel(m(x), x.double() @ m.dequantize().double().T + b.double()) < 1e-5


@pytest.mark.parametrize("fmt,bound,kernel_bound", [("int8", 1e-2, 1.5e-2), ("int4", 0.10, 0.10)])
def test_layer_error_vs_dense(fmt, bound, kernel_bound):
    """Quantized vs dense nn.Linear on Gaussian weights/inputs at a real 4B shape: weights only
    (tiled path, many rows) and weights + int8 activations (kernel path, one row)."""
    torch.manual_seed(3)
    dense = nn.Linear(2560, 1024, bias=True)
    nn.init.normal_(dense.weight, std=0.02)
    w, b = dense.weight.detach().clone(), dense.bias.detach().clone()
    q = make_quantizer(fmt)("x", dense)
    assert dense.weight is None and dense.bias is None  # the dense tensors are dropped at once
    assert q.in_features == 2560 and q.out_features == 1024
    with torch.no_grad():
        x = torch.randn(32, 2560)
        assert rel(q(x), torch.nn.functional.linear(x, w, b)) < bound
        for i in range(4):
            assert rel(q(x[i:i + 1]), torch.nn.functional.linear(x[i:i + 1], w, b)) < kernel_bound


def test_bf16_activations_and_leading_dims():
    w = torch.randn(64, 96) * 0.1
    m = Int8Linear(w)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 64)
    assert rel(y.float(), x.float() @ w.T) < 3e-2


def test_make_quantizer_validates_and_build_cli():
    with pytest.raises(ValueError):
        make_quantizer("int3")
    assert kernels.main(["--build"]) == 0  # cached after the first build: fast


def _run(llm, prompts, max_tokens=8):
    """Greedy (raw argmax: no repetition penalty) → (outputs, first step's head output [B, V])."""
    from qwenrun import SamplingParams

    logits = []
    model = llm.engine.loaded.model
    h = model.lm_head.register_forward_hook(lambda mod, i, o: logits.append(o.detach().float().clone()))
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0, logprobs=5)
    try:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    finally:
        h.remove()
    return [o.outputs[0] for o in outs], logits[0]  # first step: every prompt's last position


def assert_same_or_near_tie(dense, quant, tol: float) -> int:
    """Greedy tokens equal, or at the first divergence the dense model's logprob of its own pick
    and of the quantized pick differ by < tol (a near-tie that the quantization error can flip).
    Returns the number of divergent sequences."""
    diverged = 0
    for a, b in zip(dense, quant):
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta != tb:
                lp = a.logprobs[i]
                assert tb in lp and lp[ta] - lp[tb] < tol, (i, ta, tb, lp)
                diverged += 1
                break
    return diverged


PROMPTS = [[5, 17, 42, 99, 3], [200, 7, 7, 150, 31, 64, 11, 2, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_model_int8_int4(tmp_path, tie, monkeypatch):
    """Last-position logits: int8 within 3% relative (max abs < 0.1), int4 within 35%; greedy
    tokens (int8) equal or diverging only at near-ties: dense logprob gap < 0.2, twice the logit
    error bound (the tiny model's distributions are flat, top-3 often within 0.02-0.08). The
    fallback path too."""
    from tiny import write_tiny_checkpoint

    from qwenrun import LLM

    path = write_tiny_checkpoint(tmp_path / "m", tie=tie)
    dense, dense_logits = _run(LLM(str(path)), PROMPTS)
    q8 = LLM(str(path), quantization="int8", dtype="float32")  # weight error alone (no bf16 activations)
    model = q8.engine.loaded.model
    assert not any(type(m) is nn.Linear for m in model.modules())  # every linear swapped
    if tie:  # the head is quantized, the embedding stays dense
        assert model.model.embed_tokens.weight.dtype == torch.float32
    out8, logits8 = _run(q8, PROMPTS)
    assert rel(logits8, dense_logits) < 3e-2 and (logits8 - dense_logits).abs().max() < 0.1
    assert [o.token_ids[0] for o in out8] == [o.token_ids[0] for o in dense]
    assert_same_or_near_tie(dense, out8, 0.2)
    out4, logits4 = _run(LLM(str(path), quantization="int4", dtype="float32"), PROMPTS)
    assert rel(logits4, dense_logits) < 0.35  # ~8% per linear (iid weights, K = 64), 15 in a row
    monkeypatch.setenv("QWENRUN_NO_KERNELS", "1")
    out8f, logits8f = _run(LLM(str(path), quantization="int8", dtype="float32"), PROMPTS)
    assert rel(logits8f, dense_logits) < 3e-2
    assert_same_or_near_tie(dense, out8f, 0.2)


def test_bf16_activations_with_int8_weights(tmp_path):
    """bf16 activations (auto on CPUs with native bf16) add bf16 rounding on top of int8 weights:
    logits within 5% relative of the dense fp32 model, greedy tokens equal or near-ties; the
    many-row (prefill) bf16 GEMM path matches the fp32 tiles."""
    from tiny import write_tiny_checkpoint

    from qwenrun import LLM

    path = write_tiny_checkpoint(tmp_path / "m")
    dense, dense_logits = _run(LLM(str(path)), PROMPTS)
    out, logits = _run(LLM(str(path), quantization="int8", dtype="bfloat16"), PROMPTS)
    assert rel(logits, dense_logits) < 5e-2
    assert_same_or_near_tie(dense, out, 0.3)
    m = Int8Linear(torch.randn(300, 200) * 0.05, torch.randn(300) * 0.01)
    x = torch.randn(64, 200)  # beyond max_kernel_rows: the tiled path
    y32 = m(x)
    y16 = m(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert rel(y16.float(), y32) < 1e-2


@pytest.mark.slow
def test_demo_model_int8_int4_answers(demo_llm):
    """The real 0.5B model: int8 greedy chat answers equal the dense model's (or diverge only at
    a near-tie); int4 still answers the factual question."""
    from qwenrun import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.0, logprobs=5)
    convs = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Write a Python function that returns the square of x.",
        "Name three primary colors.")]
    dense = [o.outputs[0] for o in demo_llm.chat(convs, sp)]
    assert dense[0].text.startswith("The capital of France is Paris")
    q8 = LLM("demo", quantization="int8", kv_cache_memory=1.0)
    out8 = [o.outputs[0] for o in q8.chat(convs, sp)]
    assert_same_or_near_tie(dense, out8, 0.1)
    assert out8[0].text == dense[0].text
    del q8
    q4 = LLM("demo", quantization="int4", kv_cache_memory=1.0)
    assert "Paris" in q4.chat(convs[0], sp)[0].outputs[0].text


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_concat_equals_separate_outputs(kind):
    """q/k/v fusion of quantized linears stacks their packed rows: outputs are bit-identical."""
    cls = CLASSES[kind]
    mods = [cls(torch.randn(o, 200) * 0.05, torch.randn(o) * 0.01) for o in (128, 32, 32)]
    fused = cls.concat(mods)
    assert fused.out_features == 192 and fused.in_features == 200
    for rows in (1, 3, 64):
        x = torch.randn(rows, 200)
        assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))


@pytest.mark.parametrize("kind", ["int8", "int4", "gguf"])
def test_cached_kernel_args_follow_every_change(kind):
    """The per-call argument cache (``_QuantLinear._cached_args``) never serves stale tensors:
    assigning a buffer or an attribute, registering one, or moving the module drops it; outputs
    always equal a freshly built linear's."""
    import copy

    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(40, 256, generator=g) * 0.05, torch.randn(40, generator=g)
    if kind == "gguf":
        import numpy as np
        import gguf as gg

        from qwenrun.quant.gguf_linear import GGUFLinear, pack

        def make(bias):
            raw = gg.quants.quantize(w.numpy().astype(np.float32), gg.GGMLQuantizationType.Q8_0)
            return GGUFLinear(pack("Q8_0", raw, tuple(w.shape)), bias)
    else:
        cls = Int8Linear if kind == "int8" else Int4Linear

        def make(bias):
            return cls(w, bias)
    x = torch.randn(1, 256, generator=g)
    lin = make(b)
    y0 = lin(x)
    assert lin._kargs is not None or lin._ops is None  # the fast path filled the cache
    b2 = torch.randn(40, generator=g)
    lin.bias = b2.clone()  # assignment drops the cache
    assert torch.equal(lin(x), make(b2)(x))
    lin.register_buffer("bias", None)
    assert torch.equal(lin(x), make(None)(x))
    lin.bias = b.clone()
    assert torch.equal(lin(x), y0)
    moved = copy.deepcopy(lin)
    assert torch.equal(moved(x), y0)
    moved._apply(lambda t: t.clone())  # what .to() / .cpu() do: new tensors; the cache must follow
    moved.bias.add_(1.0)
    assert torch.allclose(moved(x) - y0, torch.ones(1, 40), atol=1e-5) and torch.equal(lin(x), y0)
    assert "_kargs" not in lin.__getstate__()
