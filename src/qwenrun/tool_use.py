"""Tool use before generation: ``tool_choice``, the forced-call grammar, and tools for chat
templates that have no tools section (Qwen1.5-Chat's).

Qwen's tool-call format (Hermes style, what the Qwen2/2.5 templates ask for and
server/tool_calls.py parses)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* ``tool_choice``: "none" (tools not shown), "auto" (the model decides), "required" (at least one
  call of any declared tool), or ``{"type": "function", "function": {"name": ...}}`` (exactly one
  call of that tool). A forced call is a Lark grammar: the tags around a JSON object whose
  ``name`` is a declared tool's and whose ``arguments`` follow that tool's parameters schema.
* A template that renders the same prompt with and without tools ignores them; for such a
  template the tools are described in a Hermes-style system prompt (as Qwen's docs do for models
  served with a Hermes tool parser), and earlier calls/results become the same tagged text."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .sampling_params import StructuredOutputsParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"


# -- tool_choice ------------------------------------------------------------------------------------
def tool_choice_mode(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | None:
    """Check ``tool_choice`` against ``tools``: "none", "auto", "required", or the name of the
    forced function; None when there are no tools and no choice. ValueError naming the problem."""
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice is None:
        return "auto" if names else None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}; got {tool_choice!r}")
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools: none were given")
        return tool_choice
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}} to force a call")
        if not names:
            raise ValueError(f"tool_choice names the function {name!r} but no tools were given")
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(names)})")
        return name
    raise ValueError("tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}")


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    if not isinstance(params, dict) or not params:
        params = {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_constraint(tools: list[dict[str, Any]], mode: str, parallel: bool | None = True,
                           special_ids: tuple[int | None, int | None] = (None, None)) -> StructuredOutputsParams | None:
    """The grammar a forced call must follow (None for "auto"/"none"). ``mode``: "required" or a
    function name; a named function is called exactly once, "required" allows several calls when
    ``parallel`` (OpenAI's default). ``special_ids``: the ids of ``<tool_call>``/``</tool_call>``
    when the tokenizer has them as single tokens (the model's natural spelling; the text spelling
    stays allowed too)."""
    if mode in ("auto", "none"):
        return None
    fns = [t["function"] for t in tools]
    chosen = [f for f in fns if f["name"] == mode] if mode != "required" else fns
    schemas = [_call_schema(f) for f in chosen]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # fixed separators, no free whitespace (as for response_format; see engine/structured.py)
    body = {**body, "x-guidance": {"whitespace_flexible": False}}
    many = mode == "required" and parallel is not False

    def tag(text: str, tid: int | None) -> str:
        return f"<[{tid}]> | {json.dumps(text)}" if tid is not None else json.dumps(text)

    lark = "\n".join([
        'start: call ("\\n" call)*' if many else "start: call",
        'call: open "\\n" body "\\n" close',
        f"open: {tag(OPEN, special_ids[0])}",
        f"close: {tag(CLOSE, special_ids[1])}",
        f"body: %json {json.dumps(body, ensure_ascii=False)}",
    ])
    return StructuredOutputsParams(grammar=lark)


def tag_token_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """Ids of the call tags when the vocabulary has each as one token (Qwen2/2.5 do)."""
    if tokenizer is None:
        return None, None
    return tokenizer.token_to_id(OPEN), tokenizer.token_to_id(CLOSE)


# -- templates without tools -------------------------------------------------------------------------
_PROBE_TOOLS = [{"type": "function", "function": {"name": "qwenrun_probe_tool", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE_CHAT = [{"role": "user", "content": "hi"}]


def template_supports_tools(render: Callable[..., str]) -> bool:
    """Whether the template shows tools at all: rendering with a tool must change the prompt.
    ``render(messages, tools=...)`` renders with the model's template."""
    try:
        return render(_PROBE_CHAT, tools=_PROBE_TOOLS) != render(_PROBE_CHAT, tools=None)
    except Exception:  # noqa: BLE001 - the template chokes on tools: let the real render report it
        return True


def hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to help with the user's request.\n\n"
            "The functions you can call are described in JSON inside <tools></tools> tags:\n"
            f"<tools>\n{specs}\n</tools>\n\n"
            "To call a function, answer with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{CLOSE}')


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return f"{OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for a template without tools: the tools described in the system message,
    earlier calls as tagged text in the assistant's content, tool results as user turns in
    ``<tool_response>`` tags (Qwen2.5's own template renders them that way)."""
    prompt = hermes_system_prompt(tools)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if i == 0 and role in ("system", "developer"):
            out.append({**m, "role": "system", "content": f"{_text(m.get('content'))}\n\n{prompt}"})
            continue
        if role == "assistant" and m.get("tool_calls"):
            parts = [_text(m.get("content"))] if m.get("content") else []
            parts += [_call_text(c) for c in m["tool_calls"] if isinstance(c, dict)]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"})
        else:
            out.append(m)
    if not messages or messages[0].get("role") not in ("system", "developer"):
        out.insert(0, {"role": "system", "content": f"You are a helpful assistant.\n\n{prompt}"})
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


_SUPPORTS: dict[str | None, bool] = {}  # chat template text -> shows tools (probed once per template)


def render_with_tools(render: Callable[..., str], template_key: str | None, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None, **kw: Any) -> str:
    """Render a chat with tools: through the template when it shows them, else with the tools in
    a Hermes-style system prompt. ``render(messages, tools=..., **kw)``; ``template_key``: the
    template's text (the probe result is kept per template)."""
    if not tools:
        return render(messages, tools=None, **kw)
    if template_key not in _SUPPORTS:
        _SUPPORTS[template_key] = template_supports_tools(
            lambda msgs, tools: render(msgs, tools=tools, add_generation_prompt=True))
    if _SUPPORTS[template_key]:
        return render(messages, tools=tools, **kw)
    return render(hermes_messages(messages, tools), tools=None, **kw)
