"""Configuration: what the checkpoint is (ModelConfig), how to run it (EngineConfig), and the
model's own sampling defaults (GenerationDefaults). Each is built once at the edge and validated in
``__post_init__``; everything downstream trusts them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass
class ModelConfig:
    """The fields of a Qwen2 ``config.json`` that change the math. Defaults are Qwen1.5-4B-Chat's."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 40
    num_attention_heads: int = 20
    num_key_value_heads: int = 20
    head_dim: int | None = None  # absent in Qwen2 configs: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = True  # Qwen2 always has q/k/v bias
    # Sliding window: only active when use_sliding_window is true, and then only for layers at or
    # above max_window_layers (transformers' Qwen2 semantics). Inert for every Qwen1.5 checkpoint.
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    bos_token_id: int | None = 151643
    eos_token_id: list[int] = field(default_factory=lambda: [151645])
    torch_dtype: str = "bfloat16"
    architecture: str = "Qwen2ForCausalLM"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}: qwenrun runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints (Qwen1.5, Qwen2, Qwen2.5 dense)"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(t) for t in (self.eos_token_id or [])]
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config.json: {name} must be a positive integer, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        if self.rope_theta <= 0:
            raise ValueError(f"config.json: rope_theta must be positive, got {self.rope_theta}")

    def sliding_window_for(self, layer_idx: int) -> int | None:
        """The attention window of one layer, or None for full causal attention."""
        if self.use_sliding_window and self.sliding_window and layer_idx >= self.max_window_layers:
            return int(self.sliding_window)
        return None

    @property
    def kv_bytes_per_token_per_element(self) -> int:
        """K and V elements one token adds to the cache across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type == "qwen2":
            arch = "Qwen2ForCausalLM"
        else:
            arch = str(model_type)
        d = dict(d)
        # transformers >= 5 writes RoPE settings as rope_parameters {rope_theta, rope_type, ...}.
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type") not in (None, "default"):
                d.setdefault("rope_scaling", rope)
        scaling = d.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise ValueError(
                f"config.json: rope_scaling {scaling!r} is not supported; remove it to run at the "
                f"native context ({d.get('max_position_embeddings')} tokens)"
            )
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw["architecture"] = arch
        if "torch_dtype" not in kw and isinstance(d.get("dtype"), str):
            kw["torch_dtype"] = d["dtype"]
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


@dataclass
class GenerationDefaults:
    """The model's own sampling defaults (``generation_config.json``), applied to chat requests
    that leave a value unset. Unset fields take transformers' ``generate()`` defaults, as the spec
    says the reference does (temperature 1.0, top_k 50, top_p 1.0)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; a generation_config.json that leaves it unset gets HF's 50 (from_dict)
    repetition_penalty: float = 1.0
    do_sample: bool = True
    eos_token_id: list[int] = field(default_factory=list)
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationDefaults":
        eos = d.get("eos_token_id", [])
        if isinstance(eos, int):
            eos = [eos]
        return cls(
            temperature=float(d.get("temperature", 1.0)),
            top_p=float(d.get("top_p", 1.0)),
            top_k=int(d.get("top_k", 50) or 0),
            repetition_penalty=float(d.get("repetition_penalty", 1.0)),
            do_sample=bool(d.get("do_sample", False)),
            eos_token_id=[int(t) for t in eos],
            max_new_tokens=d.get("max_new_tokens"),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GenerationDefaults | None":
        path = Path(path)
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid generation_config.json: {e}") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")
# "auto" (default): a GGUF file runs at its own block formats, anything else dense; None / "none":
# dense (a GGUF is dequantized); "int8" / "int4": qwenrun's formats (a GGUF is rounded a second time).
QUANTIZATIONS = ("auto", None, "int8", "int4")
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "bfloat16", "float16", "float32")


def env_default(name: str, default: Any) -> Any:
    """Every engine option can also come from QWENRUN_<NAME> in the environment."""
    v = os.environ.get("QWENRUN_" + name.upper())
    if v is None:
        return default
    if isinstance(default, bool):
        return v.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(v)
    if isinstance(default, float):
        return float(v)
    return v


@dataclass
class EngineConfig:
    """How to run a model: device, precision, memory, batching. Validated once here."""

    model: str = "Qwen/Qwen1.5-4B-Chat"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = "auto"
    max_model_len: int | None = None
    kv_cache_dtype: str = "auto"
    kv_cache_memory: float | None = None  # GiB for the KV pool; None = plan from free memory
    kv_cache_fraction: float = 0.9  # of memory left after weights and activations, when planning
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget of one engine step (prefill chunk size)
    enable_prefix_caching: bool = True
    seed: int = 0
    num_threads: int | None = None
    random_weights: bool = False  # build the config with random weights (benchmarks)
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # speculative decoding (vLLM's speculative_config): a dict / JSON string, checked into a
    # SpeculativeConfig here; None = off
    speculative_config: Any = None

    def __post_init__(self) -> None:
        from .engine.spec_config import SpeculativeConfig  # local: config sits below the engine

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a hub id, a local directory, a .gguf file or 'demo'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.quantization, str) and self.quantization.lower() == "none":
            self.quantization = None
        if self.quantization not in QUANTIZATIONS:
            raise ValueError("quantization must be one of 'auto' (a GGUF at its own precision), None or 'none' "
                             f"(dense), 'int8', 'int4'; got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of GiB, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")

    # CLI flag names that differ from the field they set (every other field reads the flag of its name).
    _FLAG_OF = {"num_threads": "threads"}

    @classmethod
    def from_args(cls, ns: Any) -> "EngineConfig":
        """The engine config of parsed CLI flags (an argparse Namespace, or anything with the flag
        attributes). Only here does a Namespace become a config: the server, the Ray replicas,
        the REPL and the benches all receive the result. A field with no flag keeps its default."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            flag = cls._FLAG_OF.get(f.name, f.name)
            if hasattr(ns, flag):
                kw[f.name] = getattr(ns, flag)
        if hasattr(ns, "no_prefix_caching"):
            kw["enable_prefix_caching"] = not ns.no_prefix_caching
        return cls(**kw)
