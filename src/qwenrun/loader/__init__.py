"""Model loading: a name (hub id, local directory, .gguf file, or ``demo``) → a ready model,
tokenizer, config and generation defaults."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngineConfig, GenerationDefaults, ModelConfig
from ..errors import ModelLoadError
from ..layers.rotary import rope_table
from ..models.qwen2 import Qwen2ForCausalLM, build_on_meta
from ..tokenizer import Tokenizer
from . import hub
from .demo import demo_gguf_path
from .gguf import read_gguf
from .safetensors import iter_safetensors

log = logging.getLogger("qwenrun")

# Configs known offline, for --random-weights without a checkpoint (values: qwen15-spec.md §1).
PRESETS: dict[str, ModelConfig] = {
    "Qwen/Qwen1.5-4B-Chat": ModelConfig(),
    "Qwen/Qwen1.5-0.5B-Chat": ModelConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                          num_attention_heads=16, num_key_value_heads=16,
                                          rope_theta=1e6, tie_word_embeddings=True),
    "Qwen/Qwen1.5-1.8B-Chat": ModelConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                          num_attention_heads=16, num_key_value_heads=16, rope_theta=1e6),
    "Qwen/Qwen1.5-7B-Chat": ModelConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32, rope_theta=1e6),
}


@dataclass
class ModelSource:
    kind: str  # "hf" (a directory) or "gguf" (a file)
    path: Path
    name: str


@dataclass
class LoadedModel:
    name: str
    model: Qwen2ForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    generation_defaults: GenerationDefaults | None
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    file_backed_bytes: int = 0  # weights used straight from an mmap'd file (page cache)
    quantization: str | None = None  # what the weights run at (resolved from EngineConfig's)

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def resolve(model: str, revision: str | None = None, progress: bool = True) -> ModelSource:
    """Find the files behind a model name, downloading from the hub when needed."""
    if model == "demo":
        return ModelSource("gguf", demo_gguf_path(), "demo")
    p = Path(os.path.expanduser(model))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf; pass a .gguf file or a model directory")
        return ModelSource("gguf", p, p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource("hf", p, p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], ggufs[0].name)
        raise ModelLoadError(f"{p} has no config.json (and not exactly one .gguf file): not a model directory")
    if model.startswith((".", "/", "~")) or not hub.looks_like_hub_id(model):
        raise ModelLoadError(f"model {model!r} not found: pass a local directory, a .gguf file, "
                             "a hub id like Qwen/Qwen1.5-4B-Chat, or 'demo'")
    local = hub.download(model, revision, progress=progress)
    return resolve(str(local), progress=progress)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes the process can still use on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return 8 << 30


def pick_dtype(dtype: str, device: torch.device, cfg: ModelConfig, quantization: str | None) -> torch.dtype:
    """``auto``: bf16 on CUDA. On CPU, dense models run fp32 (PyTorch's bf16 matrix-vector products
    are 2x slower than fp32 even with AMX, and fp32 is exact to the reference) unless fp32
    weights would not fit comfortably, then bf16; quantized models see below."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if quantization == "gguf":
        # A GGUF at its own precision: fp32 activations on every CPU, as llama.cpp keeps them. bf16
        # activations would multiply bf16 tiles of the dequantized blocks in the many-row GEMMs, a
        # second rounding of the file's weights (measured on Sapphire Rapids, demo: 160 vs 655
        # prompt tok/s, same decode). `dtype="bfloat16"` asks for that trade explicitly.
        return torch.float32
    if quantization:
        # Activations; the weights are int8/int4. Where the CPU multiplies bf16 natively
        # (AMX / AVX512-BF16) bf16 activations make prefill ~3x faster (demo int8: 977 vs 312
        # prompt tokens/s) at the same decode speed; elsewhere fp32 is the fast path.
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    params = num_params(cfg)
    return torch.float32 if params * 4 < 0.6 * available_memory(device) else torch.bfloat16


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split() or "avx512_bf16" in flags.split()


def num_params(cfg: ModelConfig) -> int:
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = d * (q + 2 * kv) + q + 2 * kv + q * d + 3 * d * f + 2 * d
    emb = cfg.vocab_size * d
    return L * layer + emb * (1 if cfg.tie_word_embeddings else 2) + d


def _random_weights(model: Qwen2ForCausalLM, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Names and shapes up front: walking the live module tree while load_weights swaps linears
    # for quantized ones would keep every replaced module (and its dense weight) alive.
    specs = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    for name, shape in specs:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
        else:
            yield name, torch.randn(shape, generator=g) * 0.02


def _progress(it: Iterator, total: int, desc: str, enabled: bool) -> Iterator:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr, dynamic_ncols=True)


def load(cfg: EngineConfig, progress: bool = True,
         on_linear: Callable | None = None) -> LoadedModel:
    """Resolve, read and build the model described by ``cfg`` (weights on the target device)."""
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    tokenizer: Tokenizer | None = None
    gen: GenerationDefaults | None = None
    if cfg.random_weights and cfg.model in PRESETS:
        mcfg, src = PRESETS[cfg.model], None
    else:
        src = resolve(cfg.model, cfg.revision, progress=progress)
    gguf_model = None
    # Work the weights don't wait for (the tokenizer, the RoPE table) runs on a helper thread while
    # they load: the repacking is mostly torch copies and page faults, which release the GIL.
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenrun-load")
    tokenizer_job: Future | None = None
    if src is not None and src.kind == "gguf":
        gguf_model = read_gguf(src.path)
        mcfg = gguf_model.config
        tokenizer_job = background.submit(Tokenizer.from_gguf, gguf_model)
    elif src is not None:
        mcfg = ModelConfig.from_file(src.path / "config.json")
        gen = GenerationDefaults.from_file(src.path / "generation_config.json")
        try:
            tokenizer = Tokenizer.from_dir(src.path)
        except ModelLoadError as e:
            if "no tokenizer.json" not in str(e):
                raise
            log.warning("%s has no tokenizer; only token-id prompts will work", src.path)
    if cfg.hf_overrides:
        mcfg = ModelConfig(**{**mcfg.__dict__, **cfg.hf_overrides})
    if tokenizer is None and cfg.random_weights:
        try:  # the Qwen vocabulary, when the demo model is installed
            tokenizer = Tokenizer.from_gguf(read_gguf(demo_gguf_path()))
        except ModelLoadError:
            tokenizer = None
    if gen is None:
        gen = GenerationDefaults()
    gen.eos_token_id = gen.eos_token_id or list(mcfg.eos_token_id)
    # "auto": a GGUF runs at its own precision (block formats kept as they are in the file);
    # a safetensors checkpoint (or random weights) stays dense unless a format is asked for.
    native = cfg.quantization == "auto" and gguf_model is not None and not cfg.random_weights
    quantization = "gguf" if native else (None if cfg.quantization == "auto" else cfg.quantization)
    dtype = pick_dtype(cfg.dtype, device, mcfg, quantization)
    if native:
        from ..quant.gguf_linear import native_on_linear

        on_linear = native_on_linear(on_linear)

    model = build_on_meta(mcfg)
    rope_job = background.submit(rope_table, mcfg.head_dim, mcfg.rope_theta, mcfg.max_position_embeddings, device)
    n_tensors = sum(1 for _ in model.named_parameters()) - (1 if mcfg.tie_word_embeddings else 0)
    if cfg.random_weights:
        weights = _random_weights(model, cfg.seed)
    elif gguf_model is not None:
        weights = gguf_model.iter_tensors(torch.float32, native=native)
    else:
        weights = iter_safetensors(src.path)
    name = cfg.model if src is None else src.name
    try:
        in_place = model.load_weights(_progress(weights, n_tensors, f"Loading {name}", progress), dtype=dtype,
                                      device=device, on_linear=on_linear)
        file_backed = in_place if (src is not None and src.kind == "hf" and device.type == "cpu") else 0
        if not file_backed:  # fusing copies; weights served straight from the page cache stay unfused
            model.fuse_qkv()
        model.rope = rope_job.result()  # = model.init_rope(device)
        if tokenizer_job is not None:
            tokenizer = tokenizer_job.result()
    finally:
        background.shutdown(wait=True, cancel_futures=True)
    model.eval()
    return LoadedModel(name=name, model=model, config=mcfg, tokenizer=tokenizer, generation_defaults=gen,
                       dtype=dtype, device=device, load_seconds=time.perf_counter() - t0,
                       file_backed_bytes=file_backed, quantization=_describe_quant(model, quantization))


def _describe_quant(model: Qwen2ForCausalLM, quantization: str | None) -> str | None:
    """What the weights run at: None (dense), "int8", "int4", or "gguf:Q4_K,Q6_K,..." (the
    block formats met in the file, kept as they are)."""
    if quantization != "gguf":
        return quantization
    kinds = sorted({q for m in model.modules() for q in str(getattr(m, "qtype", "")).split("+") if q})
    return "gguf:" + ",".join(kinds) if kinds else None
