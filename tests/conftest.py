import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny import write_tiny_checkpoint  # noqa: E402

# Equivalence tests run on every device present: the CPU always, a CUDA GPU when there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny checkpoint: GQA, untied, rope_theta 5e6, with tokenizer and template."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def demo_path() -> Path:
    from qwenrun.loader.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_llm():
    from qwenrun import LLM

    """Dense fp32 (the file dequantized): the oracle tests compare it with transformers on the same
    GGUF. The default, quantization="auto" (the file's own block formats), has tests of its own."""
    return LLM("demo", kv_cache_memory=1.0, quantization="none")
