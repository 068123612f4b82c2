"""qwenrun: a fast inference engine and OpenAI-compatible server for Qwen1.5-4B-Chat and every
Qwen2ForCausalLM checkpoint."""
from .config import EngineConfig, ModelConfig
from .errors import ContextLengthError, ModelLoadError
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "AsyncLLM":  # imports asyncio machinery only when used
        from .engine.async_engine import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig",
           "ModelConfig", "ModelLoadError", "ContextLengthError", "__version__"]
