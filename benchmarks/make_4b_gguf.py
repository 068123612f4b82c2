#!/usr/bin/env python
"""Write a GGUF at Qwen1.5-4B-Chat's exact shapes with random weights, for speed and memory work
where both engines must read the same file (the cost of a weight does not depend on its value).

    python benchmarks/make_4b_gguf.py OUT_DIR [--peer-python PY]

writes OUT_DIR/qwen15-4b-random-Q8_0.gguf with the gguf writer (Q8_0 blocks of random int8 values
and scales, F32 norms and biases, the Qwen vocabulary and chat template from the demo GGUF padded
to 151,936 rows as Qwen's own GGUFs are), then OUT_DIR/qwen15-4b-random-Q4_K_M.gguf with
llama.cpp's quantizer (llama_model_quantize, run by the benchmark venv's python: PY, default
benchmarks/peer_llamacpp.sh). Files that exist are kept. Shapes: ../shared/qwen15-spec.md §1."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = dict(vocab=151936, hidden=2560, layers=40, heads=20, kv_heads=20, ffn=6912, ctx=32768, theta=5e6, eps=1e-6)


def q8_0_blocks(rng: np.random.Generator, rows: int, cols: int, std: float = 0.02) -> np.ndarray:
    """Random Q8_0 bytes for an [rows, cols] weight of about ``std``: per 32 weights an fp16
    scale and 32 int8 values (uniform, so std = scale * 73)."""
    nb = cols // 32
    out = np.empty((rows, nb, 34), dtype=np.uint8)
    d = rng.uniform(0.7, 1.3, size=(rows, nb, 1)) * (std / 73.0)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = rng.integers(-127, 128, size=(rows, nb, 32), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, nb * 34)


def write_q8_0(path: Path, seed: int = 0) -> None:
    import gguf

    from qwenrun.loader.demo import demo_gguf_path
    from qwenrun.loader.gguf import read_gguf

    s = SHAPES
    demo = read_gguf(demo_gguf_path())
    tokens = list(demo.tokens) + [f"[PAD{i}]" for i in range(s["vocab"] - len(demo.tokens))]
    types = list(demo.token_types) + [gguf.TokenType.USER_DEFINED] * (s["vocab"] - len(demo.tokens))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("Qwen1.5-4B-Chat shapes, random weights")
    w.add_block_count(s["layers"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(demo.merges)
    for key, tid in demo.special_ids.items():
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "padding": "add_pad_token_id",
                    "eot": "add_eot_token_id", "unknown": "add_unk_token_id"}[key])(tid)
    if demo.chat_template:
        w.add_chat_template(demo.chat_template)
    rng = np.random.default_rng(seed)
    Q8 = gguf.GGMLQuantizationType.Q8_0
    h, f, v = s["hidden"], s["ffn"], s["vocab"]
    w.add_tensor("token_embd.weight", q8_0_blocks(rng, v, h), raw_dtype=Q8)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(h, np.float32))
        for n in ("q", "k", "v"):
            w.add_tensor(p + f"attn_{n}.weight", q8_0_blocks(rng, h, h), raw_dtype=Q8)
            w.add_tensor(p + f"attn_{n}.bias", (rng.standard_normal(h) * 0.02).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", q8_0_blocks(rng, h, h), raw_dtype=Q8)
        w.add_tensor(p + "ffn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(p + "ffn_gate.weight", q8_0_blocks(rng, f, h), raw_dtype=Q8)
        w.add_tensor(p + "ffn_up.weight", q8_0_blocks(rng, f, h), raw_dtype=Q8)
        w.add_tensor(p + "ffn_down.weight", q8_0_blocks(rng, h, f), raw_dtype=Q8)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.add_tensor("output.weight", q8_0_blocks(rng, v, h), raw_dtype=Q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
params.allow_requantize = True  # the input is Q8_0
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--peer-python", default=None, help="python of a venv with llama-cpp-python")
    ap.add_argument("--no-q4", action="store_true", help="only the Q8_0 file")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    q8 = args.out_dir / "qwen15-4b-random-Q8_0.gguf"
    if not q8.is_file():
        t0 = time.perf_counter()
        tmp = q8.with_suffix(".tmp")
        write_q8_0(tmp)
        tmp.rename(q8)
        print(f"wrote {q8} ({q8.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.no_q4:
        return 0
    q4 = args.out_dir / "qwen15-4b-random-Q4_K_M.gguf"
    if not q4.is_file():
        py = args.peer_python or subprocess.run([str(Path(__file__).parent / "peer_llamacpp.sh")], check=True,
                                                capture_output=True, text=True).stdout.strip()
        t0 = time.perf_counter()
        tmp = q4.with_suffix(".tmp")
        subprocess.run([py, "-c", QUANTIZE, str(q8), str(tmp)], check=True)
        tmp.rename(q4)
        print(f"wrote {q4} ({q4.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(q8)
    print(q4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
