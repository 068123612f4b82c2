"""Local Hugging Face checkpoints: sharded safetensors, memory-mapped.

``safe_open(..., framework="pt").get_tensor`` returns tensors backed by the file's mmap, so a
checkpoint already in the target dtype is never copied into anonymous memory; other dtypes are
converted one tensor at a time."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelLoadError


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, through the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shard(s) named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise ModelLoadError(f"{model_dir} holds PyTorch .bin weights only; qwenrun reads safetensors "
                                 "(convert them with transformers' save_pretrained(safe_serialization=True))")
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint; tensors are mmap-backed views."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None
