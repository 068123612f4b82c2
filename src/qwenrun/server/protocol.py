"""The wire format: OpenAI request bodies (pydantic v2) and OpenAI-shaped errors.

Request models are *strict* about types (``"temperature": "0.5"`` is a 400, as OpenAI answers)
but ignore unknown fields (``user``, ``metadata`` …), as OpenAI does. Value ranges are not
repeated here: SamplingParams owns them and its ValueError messages become 400s, so the server
and the Python API can never disagree about what is valid."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error that becomes ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Request fields a ValueError message may name (its first word): they become the error's param.
SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "max_tokens", "min_tokens", "stop", "stop_token_ids", "seed",
                    "logprobs", "top_logprobs", "logit_bias", "messages", "prompt"}
_FIELD_RE = re.compile(r"^(?:messages\[\d+\]\.)?([a-z_]+)\b")


def bad_request(message: str, fields: set[str] | None = None) -> APIError:
    """A 400 whose ``param`` names the field a ValueError message starts with, when it is one."""
    m = _FIELD_RE.match(message)
    param = m.group(1) if m and (fields is None or m.group(1) in fields) else None
    return APIError(400, message, param=param)


def validation_error(e: ValidationError) -> APIError:
    """First pydantic error as one readable 400: ``"temperature: Input should be a valid number"``."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or not p.startswith(("function-", "lax-")))
    # Unions report one loc per member (e.g. prompt.str, prompt.list[int]); the field is the head.
    head = str(err["loc"][0]) if err["loc"] else None
    msg = f"{loc}: {err['msg']}" if loc else err["msg"]
    if len(e.errors()) > 1 and head is not None:
        msg = f"{head}: invalid value ({err['msg']} at {loc})"
    return APIError(400, msg, param=head)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body (for the OpenAPI schema)."""

    error: ErrorDetail


class _Request(BaseModel):
    # strict: no silent coercion of "1" → 1; extra="ignore": OpenAI ignores unknown fields.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by chat and completions; names follow OpenAI, then vLLM's extras."""

    model: str | None = None  # None: the served model (OpenAI requires it; we are lenient)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored
    # vLLM extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's structured output: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}, and
    # the older single fields (checked in server/constraints.py: at most one constraint)
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Lenient about extra keys (name, tool_call_id …): validate_messages checks roles and content.
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer OpenAI name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # rendered by the template; calls parsed from the answer
    # "none" | "auto" (default with tools) | "required" | {"type": "function", "function": {"name"}}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # with "required": several calls allowed unless false
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (constraints.py)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_SamplingFields):
    # A string, a batch of strings, a token id list, or a batch of token id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either a prompt or chat messages (rendered with the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # Qwen adds no BOS; kept for vLLM compatibility


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)
