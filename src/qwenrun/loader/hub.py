"""Hub ids (``Qwen/Qwen1.5-4B-Chat``, optionally ``@revision``) → a local snapshot in the standard
HF cache, with huggingface_hub's progress bars. HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are
honoured by huggingface_hub itself."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelLoadError

# Files a Qwen2 checkpoint needs; skips .bin/.pth duplicates, GGUF siblings, images, etc.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-/]+\.gguf)?(@[\w.\-/]+)?$")


def looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model))


def split_hub_id(model: str, revision: str | None = None) -> tuple[str, str | None, str | None]:
    """``org/name[/file.gguf][@rev]`` → (repo_id, filename or None, revision)."""
    if "@" in model:
        model, rev = model.split("@", 1)
        revision = revision or rev
    parts = model.split("/")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    return repo_id, filename, revision


def download(model: str, revision: str | None = None, progress: bool = True) -> Path:
    """Download (or find in the cache) a hub model; returns the snapshot dir or the GGUF file."""
    try:
        import huggingface_hub as hf
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a core dependency
        raise ModelLoadError("huggingface_hub is required to download models: pip install huggingface_hub")
    repo_id, filename, revision = split_hub_id(model, revision)
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        if filename:
            return Path(hf.hf_hub_download(repo_id, filename, revision=revision))
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # network, auth, missing repo, offline mode without a cached copy
        name = type(e).__name__
        if name in ("RepositoryNotFoundError", "GatedRepoError"):
            raise ModelLoadError(f"{repo_id}: not found on the Hugging Face hub (or gated; set HF_TOKEN). "
                                 "For a local model pass its directory or .gguf path") from None
        if name == "RevisionNotFoundError":
            raise ModelLoadError(f"{repo_id}: revision {revision!r} not found on the Hugging Face hub") from None
        raise ModelLoadError(
            f"cannot download {model} from the Hugging Face hub ({name}); pass a local path instead, "
            f"e.g. `qwenrun chat /path/to/{repo_id.split('/')[-1]}` or a .gguf file") from None
