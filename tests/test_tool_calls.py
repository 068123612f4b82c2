"""Tool-call parsing (Qwen/Hermes <tool_call> blocks and bare JSON answers) and its streaming filter."""
from __future__ import annotations

import json

from qwenrun.server.tool_calls import StreamFilter, messages_for_template, parse, tool_names

NAMES = {"get_weather", "add"}
TAGGED = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def _fn(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tagged_blocks_become_calls_and_the_rest_stays_content():
    content, calls = parse(TAGGED, NAMES)
    assert content == "Let me check."
    assert _fn(calls) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_unclosed_last_block_and_string_arguments():
    content, calls = parse('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}', NAMES)
    assert content is None and calls[0]["function"]["arguments"] == '{"a": 1}'


def test_not_calls_stay_text():
    for text in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 "Plain answer.", '{"name": "unknown_tool", "arguments": {}}', '{"city": "Paris"}', "[]"):
        assert parse(text, NAMES) == (text, []), text


def test_bare_json_answers_naming_declared_tools():
    assert _fn(parse(' {"name": "get_weather", "arguments": {"city": "Paris"}}\n', NAMES)[1]) == [
        ("get_weather", {"city": "Paris"})]
    content, calls = parse('[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]', NAMES)
    assert content is None and [n for n, _ in _fn(calls)] == ["add", "get_weather"]
    # without declared names (or naming another tool) a bare JSON answer is just text
    text = '{"name": "get_weather", "arguments": {}}'
    assert parse(text) == (text, [])


def _stream(text: str, names=NAMES) -> tuple[str, str, list]:
    f, streamed = StreamFilter(names), ""
    for i in range(1, len(text) + 1):  # one character at a time: markers split anywhere
        streamed += f.delta(text[:i])
    rest, calls = f.finish(text)
    return streamed, rest, calls


def test_stream_filter_holds_back_markup_and_finishes_with_the_calls():
    streamed, rest, calls = _stream(TAGGED)
    assert streamed == "Let me check.\n" and rest == "" and len(calls) == 2
    streamed, rest, calls = _stream('{"name": "add", "arguments": {"a": 1}}')
    assert streamed == "" and rest == "" and _fn(calls) == [("add", {"a": 1})]


def test_stream_filter_passes_plain_text_and_false_alarms():
    for text in ("Hello <tool b> world", "a < b and <tool_", '{"not": "a call"}', "x <tool_call>{bad}</tool_call> y"):
        streamed, rest, calls = _stream(text)
        assert streamed + rest == text and calls == [], text


def test_tool_names_and_template_messages():
    tools = [{"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {}}, "junk"]
    assert tool_names(tools) == {"add"} and tool_names(None) == set()
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "not json"}}]}]
    out = messages_for_template(msgs)
    assert out[0] == msgs[0]
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"a": 1}, "not json"]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is not modified
