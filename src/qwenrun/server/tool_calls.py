"""Tool calls in Qwen's (Hermes-style) format, as the Qwen2/2.5 chat templates ask for them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Small models often drop the tags and answer with the bare JSON object (or a list of them); an
answer that is exactly that, naming only declared tools, is taken as the call(s) too.

``parse`` turns a finished answer into OpenAI ``tool_calls`` plus the remaining content;
``StreamFilter`` keeps tool-call markup out of streamed content deltas (the calls are sent whole,
in one delta, once the answer is finished: OpenAI clients accumulate deltas either way).
A block whose JSON does not parse, or lacks a name, stays in the content as text."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# a closed block, or an unclosed one at the very end (generation stopped at the end-of-turn token)
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def finish_reason(calls: list[dict[str, Any]], reason: str | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model stopped on its own after calling."""
    return "tool_calls" if calls and reason == "stop" else reason


def validate_tools(tools: Any) -> None:
    """OpenAI's tool shape: ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``.
    A malformed entry is the client's mistake (ValueError → 400), never silently dropped."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}}")
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{...}}}} (only function tools exist)")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function is missing: give {{'name': ..., 'parameters': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
            raise ValueError(f"{where}.function.description must be a string")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise ValueError(f"{where}.function.parameters must be a JSON Schema object")


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """Names of the declared functions (OpenAI ``{"type": "function", "function": {"name": ...}}``)."""
    out = set()
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.add(fn["name"])
    return out


def _bare(text: str, names: set[str]) -> list[dict[str, Any]]:
    """Calls when the whole answer is a JSON call object (or a list of them) naming declared tools."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    objs = obj if isinstance(obj, list) and obj else [obj]
    calls = [_call(o) for o in objs]
    if all(c is not None and c["function"]["name"] in names for c in calls):
        return calls
    return []


def parse(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content without the tool-call blocks, or None when nothing else was said; tool_calls).
    ``names``: the declared tools, which a bare JSON answer must call to count as calls."""
    if names and text.strip()[:1] in ("{", "["):
        calls = _bare(text.strip(), names)
        if calls:
            return None, calls
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is None:
            continue  # not a call: the block stays in the content
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return content or None, calls


class StreamFilter:
    """Streamed content up to the first tool-call marker; a partial marker at the end of the text
    is held back until the next token shows whether it is one."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.names = names
        self.sent = 0
        self.in_call = False

    def delta(self, text: str) -> str:
        if self.in_call:
            return ""
        if self.sent == 0 and self.names:  # an answer opening with JSON may be a bare call: hold it
            head = text.lstrip()
            if not head:
                return ""
            if head[0] in "{[":
                self.in_call = True
                return ""
        i = text.find(OPEN, self.sent)
        if i >= 0:
            self.in_call = True
            out, self.sent = text[self.sent:i], i
            return out
        end = len(text)
        for k in range(min(len(OPEN) - 1, end - self.sent), 0, -1):  # a prefix of the marker at the end
            if OPEN.startswith(text[end - k:]):
                end -= k
                break
        out, self.sent = text[self.sent:end], end
        return out

    def finish(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """At the end: the content not streamed yet (text around the calls) and the calls."""
        tail, self.sent = text[self.sent:], len(text)
        content, calls = parse(tail, self.names)
        return (content or "", calls) if calls else (tail, [])


def messages_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI sends an assistant's earlier calls with ``arguments`` as a JSON string; Qwen's
    templates print ``arguments | tojson``: give them the object (as vLLM and transformers do)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except json.JSONDecodeError:
                        pass  # not JSON: the template gets the string as sent
                    c = {**c, "function": fn}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
