"""The synchronous Python API, shaped like vLLM's ``LLM``."""
from __future__ import annotations

import itertools
from dataclasses import replace
from collections.abc import Iterator, Sequence as Seq
from typing import Any

from . import tool_use
from .chat_template import render_chat
from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import OutputKind, RequestOutput
from .sampling_params import SamplingParams
from .errors import RequestFailedError
from .tokenizer import Tokenizer


class LLM:
    """Load a model once, then ``generate()`` / ``chat()`` through the batching engine.

    ``model``: a hub id (``Qwen/Qwen1.5-4B-Chat[@rev]``), a local HF directory, a .gguf file, or
    ``"demo"``. Keyword options are EngineConfig fields: dtype, device, quantization,
    max_model_len, kv_cache_dtype, kv_cache_memory, enable_prefix_caching, seed, ..."""

    def __init__(self, model: str = "Qwen/Qwen1.5-4B-Chat", *, progress: bool = False, **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config, progress=progress)
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False) -> "LLM":
        self = cls.__new__(cls)
        self.config = config
        self.engine = LLMEngine(config, progress=progress)
        self._ids = itertools.count()
        return self

    def get_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: Seq[int] | Seq[Seq[int]] | None = None) -> list[RequestOutput]:
        """Run every prompt through the engine at once (continuously batched); outputs keep the
        order of the prompts."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("pass prompts or prompt_token_ids, not both")
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if prompts is not None:
            items = [(p, None) for p in ([prompts] if isinstance(prompts, str) else list(prompts))]
        else:
            ids = list(prompt_token_ids)
            if ids and isinstance(ids[0], int):
                ids = [ids]
            items = [(None, list(x)) for x in ids]
        if not items:
            return []
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts")
        return self._run(items, params)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, parallel_tool_calls: bool | None = None) -> list[RequestOutput]:
        """Chat completion(s) with the model's own template; unset sampling values take the
        model's generation_config defaults. ``tools`` (OpenAI function specs) go to the template
        (or, for a template without tools, into a Hermes-style system prompt). ``tool_choice``:
        "auto" (default), "none", "required" or {"type": "function", "function": {"name": ...}};
        a forced call is constrained to ``<tool_call>{"name", "arguments"}</tool_call>`` blocks
        whose arguments follow the tool's parameters schema."""
        from .server.tool_calls import validate_tools  # the one check of the OpenAI tool shape

        validate_tools(tools)
        mode = tool_use.tool_choice_mode(tools, tool_choice)
        use_tools = bool(tools) and mode != "none"
        params = sampling_params or SamplingParams()
        if use_tools and mode != "auto":
            if params.structured_outputs is not None:
                raise ValueError("a forced tool call is a constraint already: drop structured_outputs or tool_choice")
            forced = tool_use.forced_call_constraint(tools, mode, parallel_tool_calls,
                                                     tool_use.tag_token_ids(self.engine.tokenizer))
            params = replace(params, structured_outputs=forced)
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message,
                                            chat_template=chat_template, tools=tools if use_tools else None)
                   for c in convs]
        return self.generate(prompts, params)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            tools: list[dict] | None = None) -> str:
        tok = self.get_tokenizer()
        template = chat_template or tok.chat_template

        def render(msgs: list[dict], **kw: Any) -> str:
            return render_chat(template, msgs, special_tokens={
                "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}, **kw)

        return tool_use.render_with_tools(render, template, messages, tools,
                                          add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message)

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None) -> Iterator[RequestOutput]:
        """Yield cumulative RequestOutputs of one request as tokens arrive. Closing the iterator
        early (or Ctrl-C) aborts the request and frees its blocks."""
        eng = self.engine
        rid = f"llm-{next(self._ids)}"
        eng.add_request(rid, prompt, sampling_params, prompt_token_ids=prompt_token_ids)
        done = False
        try:
            while not done:
                for out in eng.step():
                    if out.request_id == rid:
                        done = out.finished
                        if out.error is not None:
                            raise RequestFailedError(out.error)
                        yield out
        finally:
            if not done:
                eng.abort_request(rid)

    def _run(self, items: list[tuple[str | None, list[int] | None]], params: list[SamplingParams]) -> list[RequestOutput]:
        eng = self.engine
        ids = []
        try:
            for (prompt, toks), sp in zip(items, params):
                rid = f"llm-{next(self._ids)}"
                # final: one output per request at its end (no per-step copies of its history)
                eng.add_request(rid, prompt, sp, prompt_token_ids=toks, output_kind=OutputKind.FINAL)
                ids.append(rid)
            final: dict[str, RequestOutput] = {}
            while len(final) < len(ids):
                for out in eng.step():
                    if out.error is not None:
                        raise RequestFailedError(f"request {ids.index(out.request_id)} failed: {out.error}")
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in ids:  # a bad prompt or Ctrl-C: leave the engine clean
                eng.abort_request(rid)
            raise
        return [final[r] for r in ids]


def load_llm(cfg: EngineConfig) -> LLM:
    """Build the LLM with progress bars, then report on stderr what was loaded and how long it took
    (the CLI's ``generate`` and ``chat``)."""
    import sys
    import time

    t0 = time.perf_counter()
    llm = LLM.from_config(cfg, progress=True)
    lm = llm.engine.loaded
    print(f"Loaded {lm.name} ({lm.weight_bytes / 2**30:.2f} GiB, {str(lm.dtype).replace('torch.', '')}"
          f"{', ' + lm.quantization if lm.quantization else ''}, {lm.device}) in "
          f"{time.perf_counter() - t0:.1f}s. {llm.engine.plan.report()}", file=sys.stderr)
    return llm
