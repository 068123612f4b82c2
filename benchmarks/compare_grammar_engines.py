"""llguidance vs xgrammar on the demo tokenizer: set-up, compile and mask time per token (the
measurement behind the choice in engine/structured.py; numbers in BENCHMARKS.md).

xgrammar is not a qwenrun dependency (it would pull triton); to run this, put it beside the venv
without its dependencies, e.g.:

    pip download --no-deps xgrammar apache-tvm-ffi -d /tmp/whl
    .venv/bin/pip install --no-deps --target /tmp/xg /tmp/whl/*.whl
    XGRAMMAR_PATH=/tmp/xg .venv/bin/python benchmarks/compare_grammar_engines.py"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from qwenrun.loader.demo import demo_gguf_path
from qwenrun.loader.gguf import read_gguf
from qwenrun.tokenizer import Tokenizer

V = 151936  # the demo model's logits width
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]},
    "kind": {"enum": ["a", "b", "c"]}}, "required": ["name", "age", "tags", "kind"]}
ANSWER = json.dumps({"name": "Alice Smith", "age": 42, "tags": ["x", "hello world"],
                     "address": {"city": "Paris", "zip": "75001"}, "kind": "b"})


def report(name: str, setup: float, compile_s: float, ms: list[float]) -> None:
    print(f"{name}: tokenizer set-up {setup:.2f} s, compile {compile_s * 1e3:.1f} ms, mask per token mean "
          f"{statistics.mean(ms):.3f} / median {statistics.median(ms):.3f} / max {max(ms):.3f} ms ({len(ms)} masks)")


def main() -> None:
    tok = Tokenizer.from_gguf(read_gguf(demo_gguf_path()))
    ids = tok.encode(ANSWER)
    eos = [151645, 151643]

    import llguidance as llg

    t0 = time.perf_counter()
    lt = tok.llguidance_tokenizer(V, eos)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(SCHEMA))
    comp = time.perf_counter() - t0
    mask = torch.zeros((1, (V + 31) // 32), dtype=torch.int32)
    ms = []
    for t in ids + [None]:
        t0 = time.perf_counter()
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        ms.append(1e3 * (time.perf_counter() - t0))
        if t is not None:
            assert m.consume_token(t), m.get_error()
    assert m.is_accepting()
    report("llguidance", setup, comp, ms)

    path = os.environ.get("XGRAMMAR_PATH")
    if path:
        sys.path.insert(0, path)
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar: not installed (see the docstring)")
        return
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(len(tok))], vocab_type=xgr.VocabType.RAW,
                             vocab_size=V, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(SCHEMA))
    comp = time.perf_counter() - t0
    mm = xgr.GrammarMatcher(cg)
    bm = xgr.allocate_token_bitmask(1, V)
    ms = []
    for t in ids + [None]:
        t0 = time.perf_counter()
        mm.fill_next_token_bitmask(bm, 0)
        ms.append(1e3 * (time.perf_counter() - t0))
        if t is not None:
            assert mm.accept_token(t)
    report("xgrammar", setup, comp, ms)


if __name__ == "__main__":
    main()
