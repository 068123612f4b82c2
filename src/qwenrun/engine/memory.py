"""Memory planning: weights + KV pool + activation peak against the memory that is available.

Run once at start-up, after the weights are loaded. The result is one report line
("KV pool: N tokens = X GiB (dtype); max context Y") and either a pool that fits or a clear
refusal: we never start a server that would run out of memory mid-request."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..loader import LoadedModel, available_memory
from .kv_cache import KVCache, bytes_per_token, kv_storage_dtype

log = logging.getLogger("qwenrun")
GiB = 1 << 30
CPU_DEFAULT_POOL = 4 * GiB  # like vLLM's CPU backend default, raised to one full context if needed


@dataclass
class KVPlan:
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    bytes_per_token: int
    max_model_len: int
    activation_bytes: int
    available_bytes: int
    num_layers: int
    kv_heads: int
    head_dim: int
    device: torch.device
    decode_gather_tokens: int | None = None  # ModelRunner's decode group budget (rows x context)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def pool_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def report(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"KV pool: {self.num_tokens} tokens = {self.pool_bytes / GiB:.2f} GiB ({dt}); "
                f"max context {self.max_model_len}")

    def allocate(self) -> KVCache:
        return KVCache(self.num_layers, self.num_blocks, self.block_size, self.kv_heads, self.head_dim,
                       self.dtype, self.device)


# Decode attention gathers each group's K/V ([rows, padded context, Hkv, d], one layer at a time).
# The budget, in rows x context tokens, is at least one full context and at least this many bytes.
DECODE_GATHER_BYTES = 256 << 20


def decode_gather_tokens(cfg: EngineConfig, lm: LoadedModel, kv_dtype: torch.dtype) -> int:
    """Rows x padded context one decode attention group may gather (ModelRunner splits decode
    batches by it): never less than one whole context, so any single decode fits."""
    m = lm.config
    want_len = cfg.max_model_len or m.max_position_embeddings
    elem = torch.empty((), dtype=lm.dtype).element_size()
    per_tok = 2 * m.num_key_value_heads * m.head_dim * elem  # K + V of one token, one layer
    return max(want_len, DECODE_GATHER_BYTES // per_tok)


def _fused_decode(kv_dtype: torch.dtype, device: torch.device) -> bool:
    """int8 KV on CPU: decode attends the int8 rows in place (no gathered copy)."""
    return kv_dtype == torch.int8 and device.type == "cpu"


def activation_bytes(cfg: EngineConfig, lm: LoadedModel, kv_dtype: torch.dtype | None = None) -> int:
    """Peak scratch memory of one step: hidden states of a full prefill chunk, the widest
    intermediate, logits and sampler temporaries for every sequence, attention scratch (the
    decode K/V gather of one group at its budget, with its dequantized / converted copies)."""
    m = lm.config
    elem = torch.empty((), dtype=lm.dtype).element_size()
    t = cfg.max_num_batched_tokens
    qkv = (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
    per_token = (6 * m.hidden_size + qkv + 3 * m.intermediate_size) * elem
    logits = cfg.max_num_seqs * m.vocab_size * 4 * 4  # logits, processed copy, noise, sort
    kv_dtype = kv_dtype or lm.dtype
    g = decode_gather_tokens(cfg, lm, kv_dtype)
    gather = g * 16  # slot indices and the mask
    if not _fused_decode(kv_dtype, lm.device):
        gather += 3 * g * 2 * m.num_key_value_heads * m.head_dim * elem  # K+V, fp32 dequant, dtype copy
    return t * per_token + logits + gather + 256 * (1 << 20)


def plan_kv_pool(cfg: EngineConfig, lm: LoadedModel) -> KVPlan:
    m = lm.config
    model_max = m.max_position_embeddings
    if cfg.max_model_len is not None and cfg.max_model_len > model_max:
        raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's context of {model_max} tokens "
                         f"(max_position_embeddings)")
    want_len = cfg.max_model_len or model_max
    dtype = kv_storage_dtype(cfg.kv_cache_dtype, lm.dtype, lm.device)
    per_tok = bytes_per_token(m.num_hidden_layers, m.num_key_value_heads, m.head_dim, dtype)
    act = activation_bytes(cfg, lm, dtype)
    avail = available_memory(lm.device) - lm.file_backed_bytes  # mmap'd weights must stay resident
    budget = max(0, avail - act)
    if cfg.kv_cache_memory is not None:
        pool = int(cfg.kv_cache_memory * GiB)
        if pool > budget:
            raise ValueError(f"kv_cache_memory {cfg.kv_cache_memory:.2f} GiB does not fit: {budget / GiB:.2f} GiB "
                             f"is left after weights ({lm.weight_bytes / GiB:.2f} GiB) and activations "
                             f"({act / GiB:.2f} GiB)")
    elif lm.device.type == "cuda":
        pool = int(cfg.kv_cache_fraction * budget)
    else:
        pool = min(int(cfg.kv_cache_fraction * budget), max(CPU_DEFAULT_POOL, want_len * per_tok),
                   cfg.max_num_seqs * want_len * per_tok)
    bs = cfg.block_size
    num_blocks = pool // (per_tok * bs)
    tokens = num_blocks * bs
    if tokens < want_len:
        need = want_len * per_tok
        hint = ("lower --max-model-len, use --kv-cache-dtype int8, or --quantization int8"
                if cfg.kv_cache_dtype == "auto" else "lower --max-model-len or use --quantization int8")
        if cfg.max_model_len is not None or tokens < min(want_len, 256):
            raise ValueError(f"a {want_len}-token context needs {need / GiB:.2f} GiB of KV cache but only "
                             f"{pool / GiB:.2f} GiB fits (weights {lm.weight_bytes / GiB:.2f} GiB, activations "
                             f"{act / GiB:.2f} GiB, available {avail / GiB:.2f} GiB): {hint}")
        log.warning("only %d tokens of KV fit in memory: max context lowered from %d to %d (%s)",
                    tokens, want_len, tokens, hint)
        want_len = tokens
    plan = KVPlan(num_blocks=num_blocks, block_size=bs, dtype=dtype, bytes_per_token=per_tok,
                  max_model_len=want_len, activation_bytes=act, available_bytes=avail,
                  decode_gather_tokens=decode_gather_tokens(cfg, lm, dtype),
                  num_layers=m.num_hidden_layers, kv_heads=m.num_key_value_heads, head_dim=m.head_dim,
                  device=lm.device)
    log.info(plan.report())
    return plan
