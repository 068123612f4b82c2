"""GGUF loading: a tiny GGUF written in-test with the gguf writer, and the real demo model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.config import EngineConfig
from qwenrun.loader import load
from test_model_parity import PROMPT, full_logits
from tiny import QWEN15_TEMPLATE

_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(src_dir, dst, qtype: str = "F32", quantizer=None, types: dict[str, str] | None = None):
    """Convert a tiny HF checkpoint to GGUF the way llama.cpp's converter lays it out. 2-D
    tensors get ``qtype``, or ``types[fragment]`` for names containing that fragment; block
    formats are written by ``quantizer(array, qtype)`` (default: gguf's quantizer)."""
    import gguf
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTok

    cfg = json.loads((src_dir / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    w = gguf.GGUFWriter(str(dst), "qwen2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tk = HFTok.from_file(str(src_dir / "tokenizer.json"))
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t.content for t in tk.get_added_tokens_decoder().values()}
    model = json.loads(tk.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(QWEN15_TEMPLATE)
    sd = load_file(str(src_dir / "model.safetensors"))
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        arr = t.float().numpy()
        kind = next((v for k, v in (types or {}).items() if k in g), qtype)
        if kind == "F16" and arr.ndim == 2:
            w.add_tensor(g, arr.astype(np.float16))
        elif kind != "F32" and arr.ndim == 2:
            qt = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(g, (quantizer or gguf.quants.quantize)(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_tiny_gguf_f32_gives_the_same_logits_as_safetensors(tiny_dir, tmp_path):
    path = write_gguf(tiny_dir, tmp_path / "tiny-f32.gguf")
    a = load(EngineConfig(model=str(tiny_dir), dtype="float32"), progress=False)
    b = load(EngineConfig(model=str(path), dtype="float32"), progress=False)
    assert b.config.rope_theta == a.config.rope_theta and b.config.num_key_value_heads == a.config.num_key_value_heads
    ids = a.tokenizer.encode(PROMPT)
    assert b.tokenizer.encode(PROMPT) == ids  # tokenizer rebuilt from GGUF metadata
    assert b.tokenizer.chat_template == QWEN15_TEMPLATE
    diff = (full_logits(a.model, ids) - full_logits(b.model, ids)).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q5_0", "Q4_0"])
def test_tiny_gguf_block_quantized_tensors(tiny_dir, tmp_path, qtype):
    """Block formats load to the same dense values the gguf reference dequantizer produces, with
    names and shapes mapped; the model stays close to the unquantized one."""
    import gguf
    from safetensors.torch import load_file

    from qwenrun.loader.gguf import read_gguf

    path = write_gguf(tiny_dir, tmp_path / f"tiny-{qtype}.gguf", qtype)
    lm = load(EngineConfig(model=str(path), dtype="float32"), progress=False)
    sd = load_file(str(tiny_dir / "model.safetensors"))
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    loaded = dict(read_gguf(path).iter_tensors())  # HF names, dense, as the model receives them
    assert set(loaded) == set(sd)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"):
        ref = gguf.quants.dequantize(gguf.quants.quantize(sd[name].numpy(), qt), qt).astype(np.float32)
        np.testing.assert_array_equal(loaded[name].float().numpy(), ref)
    dense = load(EngineConfig(model=str(tiny_dir), dtype="float32"), progress=False)
    ids = dense.tokenizer.encode(PROMPT)
    a, b = full_logits(dense.model, ids), full_logits(lm.model, ids)
    rel = ((a - b).norm() / a.norm()).item()
    # Random tiny weights (std 0.15) amplify weight error ~8x through the layers: these bounds are
    # that amplification times each format's step; the exact-equality check above is the real test.
    assert rel < {"F16": 0.002, "BF16": 0.02, "Q8_0": 0.06, "Q5_0": 0.4, "Q4_0": 0.8}[qtype], rel


def test_demo_capital_of_france(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"


@pytest.mark.slow
def test_demo_greedy_tokens_match_transformers_on_the_same_gguf(demo_llm, demo_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name)
    ref = AutoModelForCausalLM.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name,
                                               dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "用一句话介绍一下你自己。"]
    for q in prompts:
        msgs = [{"role": "user", "content": q}]
        ids = demo_llm.get_tokenizer().encode(demo_llm.apply_chat_template(msgs))
        assert ids == ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        ours = demo_llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            temperature=0, max_tokens=24, repetition_penalty=1.0))[0].outputs[0].token_ids
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.0,
                              top_p=None, top_k=None, temperature=None)[0, len(ids):].tolist()
        if theirs and theirs[-1] in (151645, 151643):
            theirs = theirs  # both stop at (and include) the end-of-turn token
        assert ours == theirs[:len(ours)] and len(ours) == len(theirs), q
