"""Tiny random Qwen2 checkpoints written by the tests themselves (transformers is the writer and
the oracle), with a small byte-level BPE tokenizer built the Qwen2 way, so every path (text in,
text out, chat template, stop strings) runs on a model that loads in milliseconds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

QWEN15_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n",
    "你好，世界。今天天气很好。 🤗 emoji and 1234567890 digits; Paris is the capital of France.",
    "<html><body>Stop strings, tokens and bytes: ###, ---, END, \"quotes\", 'single'</body></html>",
]


def build_tokenizer(vocab_size: int = 400):
    """A Qwen2-pipeline byte-level BPE trained on a small corpus (ids: 256 bytes + merges + specials)."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    from qwenrun.tokenizer import _qwen2_pipeline
    from tokenizers import models

    tk = _qwen2_pipeline(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tk.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tk.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tk


def write_tiny_checkpoint(path: str | os.PathLike, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, intermediate: int = 96, head_dim: int | None = None,
                          rope_theta: float = 5e6, tie: bool = False, max_pos: int = 1024,
                          extra_vocab: int = 0, shards: int = 1, seed: int = 0, dtype=torch.float32,
                          use_sliding_window: bool = False, sliding_window: int | None = None,
                          max_window_layers: int = 0, generation_config: dict | None = None,
                          tokenizer: bool = True) -> Path:
    """Write a random Qwen2ForCausalLM (+ tokenizer) with transformers; returns the directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer()
    n_tok = tk.get_vocab_size(with_added_tokens=True)
    eos = tk.token_to_id("<|im_end|>")
    cfg = Qwen2Config(
        vocab_size=n_tok + extra_vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos, rope_theta=rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, bos_token_id=tk.token_to_id("<|endoftext|>"), eos_token_id=eos,
        use_sliding_window=use_sliding_window, sliding_window=sliding_window,
        max_window_layers=max_window_layers, torch_dtype="float32",
    )
    if head_dim is not None:
        cfg.head_dim = head_dim
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger-than-default weights: logits far from uniform, greedy decisive
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if p.dim() > 1 else 0.05)
    model.save_pretrained(path, safe_serialization=True,
                          max_shard_size=_shard_size(model, shards) if shards > 1 else "10GB")
    gen = generation_config if generation_config is not None else {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": [eos, cfg.bos_token_id], "do_sample": True,
        "repetition_penalty": 1.1, "top_p": 0.8}
    (path / "generation_config.json").write_text(json.dumps(gen))
    if tokenizer:
        tk.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": QWEN15_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "bos_token": None, "tokenizer_class": "Qwen2Tokenizer", "model_max_length": max_pos,
            "added_tokens_decoder": {str(tk.token_to_id(s)): {"content": s, "special": True, "lstrip": False,
                                                              "rstrip": False, "normalized": False,
                                                              "single_word": False} for s in SPECIALS},
        }))
    return path


def _shard_size(model, shards: int) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, total // shards + 1)


def hf_model(path: str | os.PathLike, dtype=torch.float32):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
