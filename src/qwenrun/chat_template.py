"""The model's own chat template, rendered as transformers' ``apply_chat_template`` renders it:
an immutable sandboxed jinja2 environment with trim_blocks/lstrip_blocks, loop controls, a
non-HTML-escaping ``tojson``, ``raise_exception`` and ``strftime_now``. Templates come from the
checkpoint (untrusted code), hence the sandbox."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Qwen1.5-Chat's final template (spec §1.5): used for checkpoints that ship none.
CHATML_FALLBACK = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool", "developer")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (assistant-mask markers): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the model's chat template does not compile: {e}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of a chat: a non-empty list of {role, content} with known roles."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        content = m.get("content")
        if role == "assistant":
            _check_calls(m, i)
        if content is None and not (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            raise ValueError(f"messages[{i}].content is missing")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part "
                                     "{'type': 'text', 'text': ...}; qwenrun models read text only")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append(m)
    return out


def _check_function(fn: Any, where: str) -> None:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where} must be an object with a non-empty 'name' and 'arguments'")
    if "arguments" not in fn or not isinstance(fn["arguments"], (str, dict)):
        raise ValueError(f"{where}.arguments must be a JSON string (or an object)")


def _check_calls(m: dict[str, Any], i: int) -> None:
    """An assistant's earlier ``tool_calls`` / legacy ``function_call`` must be whole: templates
    print them field by field, and a missing field would render as garbage or fail."""
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ValueError(f"messages[{i}].tool_calls must be a list of tool calls")
        for j, c in enumerate(calls):
            if not isinstance(c, dict):
                raise ValueError(f"messages[{i}].tool_calls[{j}] must be an object")
            if c.get("type", "function") != "function":
                raise ValueError(f"messages[{i}].tool_calls[{j}].type must be 'function'")
            _check_function(c.get("function"), f"messages[{i}].tool_calls[{j}].function")
    if m.get("function_call") is not None:
        _check_function(m["function_call"], f"messages[{i}].function_call")


def render_chat(template: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list | None = None,
                special_tokens: dict[str, str | None] | None = None, **kwargs: Any) -> str:
    """Render ``messages`` with ``template`` (or the ChatML fallback) to the prompt string."""
    messages = validate_messages(messages)
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    ctx = dict(special_tokens or {})
    ctx.update(kwargs)
    try:
        text = _compile(template or CHATML_FALLBACK).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **ctx)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # The template (untrusted code) choked on this conversation: the request's problem.
        raise ValueError(f"chat template error: the conversation cannot be rendered ({type(e).__name__}: {e})") from None
    if continue_final_message:
        final = messages[-1].get("content") or ""
        idx = text.rfind(final)
        if not final or idx < 0:
            raise ValueError("continue_final_message: the final message was not found in the rendered prompt")
        text = text[: idx + len(final)]
    return text
