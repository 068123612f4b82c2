"""The fast GGUF load path (loader/gguf.py: a layer's q/k/v and gate/up packed as one weight and
stacked without a copy) gives exactly the model the per-tensor path gives: same modules, same
buffers (torch.equal, same dtypes), same kernel choices."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from qwenrun.config import EngineConfig
from qwenrun.loader import load
from qwenrun.loader.gguf import GGUFModel
from qwenrun.quant.linear import _cat_rows


def _load(path, stack: bool, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(GGUFModel, "iter_tensors", functools.partialmethod(GGUFModel.iter_tensors.__wrapped__
                                                                      if hasattr(GGUFModel.iter_tensors, "__wrapped__")
                                                                      else GGUFModel.iter_tensors, stack=stack))
        return load(EngineConfig(model=str(path)), progress=False)


def _assert_same_model(a, b):
    ma, mb = dict(a.model.named_modules()), dict(b.model.named_modules())
    assert list(ma) == list(mb)
    for name, x in ma.items():
        y = mb[name]
        assert type(x) is type(y), name
        for attr in ("qtype", "G", "S", "nib", "in_features", "out_features"):
            assert getattr(x, attr, None) == getattr(y, attr, None), (name, attr)
        assert (getattr(x, "_ops", 0) is None) == (getattr(y, "_ops", 0) is None), name
        bx, by = dict(x.named_buffers(recurse=False)), dict(y.named_buffers(recurse=False))
        px, py = dict(x.named_parameters(recurse=False)), dict(y.named_parameters(recurse=False))
        assert bx.keys() == by.keys() and px.keys() == py.keys(), name
        for k in bx:
            if bx[k] is None:
                assert by[k] is None, (name, k)
                continue
            assert bx[k].dtype == by[k].dtype and bx[k].is_contiguous() and torch.equal(bx[k], by[k]), (name, k)
        for k in px:
            assert px[k].dtype == py[k].dtype and torch.equal(px[k], py[k]), (name, k)
    assert a.quantization == b.quantization


def test_stacked_load_equals_per_tensor_load_demo(demo_path, monkeypatch):
    fast, slow = _load(demo_path, True, monkeypatch), _load(demo_path, False, monkeypatch)
    _assert_same_model(fast, slow)
    assert fast.weight_bytes == slow.weight_bytes


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """q/k in one format, v in another (q/k/v not stackable), gate/up stackable; and a Q8_0 file
    (every stack stackable)."""
    from test_gguf_native import _kquant_gguf
    from tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("mixed")
    src = write_tiny_checkpoint(d / "hf", hidden=256, intermediate=512, heads=4, kv_heads=2, tie=True)
    kq = _kquant_gguf(src, d / "kq.gguf", {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K",
                                           "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
                                           "ffn_up": "Q4_K", "ffn_down": "Q6_K"})
    q8 = _kquant_gguf(src, d / "q8.gguf", {})
    q40 = _kquant_gguf(src, d / "q40.gguf", {"attn": "Q4_0", "ffn": "Q5_1", "token_embd": "Q8_0"})
    return [kq, q8, q40]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_stacked_load_equals_per_tensor_load_mixed_formats(mixed_gguf, monkeypatch, i):
    fast, slow = _load(mixed_gguf[i], True, monkeypatch), _load(mixed_gguf[i], False, monkeypatch)
    _assert_same_model(fast, slow)
    for layer in fast.model.model.layers:  # stacked without a copy: one storage per fused weight
        gu = layer.mlp.gate_up_proj
        assert gu is not None and gu.q.untyped_storage().nbytes() == gu.q.numel() * gu.q.element_size()


def test_cat_rows_views_adjacent_blocks_and_copies_otherwise():
    base = torch.arange(24, dtype=torch.int8).view(6, 4)
    parts = [base[0:1], base[1:4], base[4:6]]
    v = _cat_rows(parts)
    assert torch.equal(v, base) and v.data_ptr() == base.data_ptr() and v.is_contiguous()
    swapped = _cat_rows([base[1:4], base[0:1]])  # not in storage order: a real cat
    assert torch.equal(swapped, torch.cat([base[1:4], base[0:1]])) and swapped.data_ptr() != base.data_ptr()
    other = torch.zeros(2, 4, dtype=torch.int8)
    mixed = _cat_rows([base[0:2], other])
    assert torch.equal(mixed, torch.cat([base[0:2], other]))
    gap = _cat_rows([base[0:1], base[2:3]])
    assert torch.equal(gap, torch.cat([base[0:1], base[2:3]])) and gap.data_ptr() != base.data_ptr()
    f = torch.arange(6, dtype=torch.float16)
    assert torch.equal(_cat_rows([f[0:2], f[2:6]]), f)


def test_iter_tensors_yields_row_views_of_one_packed_weight(mixed_gguf):
    from qwenrun.loader.gguf import read_gguf
    from qwenrun.quant.gguf_linear import BlockWeight, pack

    g = read_gguf(mixed_gguf[1])  # Q8_0: every stack stackable
    by_gguf = {t.name: t for t in g.tensors}
    got = {n: w for n, w in g.iter_tensors(native=True) if isinstance(w, BlockWeight)}
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    ptrs = {got[n].q.untyped_storage().data_ptr() for n in names}
    assert len(ptrs) == 1  # one buffer, three row views
    g2 = read_gguf(mixed_gguf[1])
    for p, leaf in zip("qkv", ("attn_q", "attn_k", "attn_v")):
        t = by_gguf[f"blk.0.{leaf}.weight"]
        alone = pack(t.type_name, g2.tensors[g.tensors.index(t)].data, t.shape)
        w = got[f"model.layers.0.self_attn.{p}_proj.weight"]
        assert torch.equal(w.q, alone.q) and torch.equal(w.d, alone.d) and w.shape == alone.shape
