"""Structured output in the engine, on the tiny random checkpoint: its text is noise, so every
constrained answer that validates shows the grammar did the work (greedy and seeded sampling,
n > 1, batches mixing constrained and plain requests, preemption by recompute, prefix caching,
stop strings, logprobs), and plain requests keep exactly their tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from qwenrun import LLM, SamplingParams
from qwenrun.engine import structured
from qwenrun.sampling_params import StructuredOutputsParams
from qwenrun.server import tool_calls
from qwenrun.tool_use import hermes_system_prompt

PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny model: layers * (K,V) * kv_heads * head_dim * fp32 bytes

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "email": {"type": "string", "maxLength": 10}},
                 "required": ["id", "email"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "level": {"enum": ["low", "mid", "high"]}}, "required": ["tags", "level"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        # (fractional numbers are checked on the demo model: noise can extend a fraction forever)
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "temp": {"type": "integer", "exclusiveMinimum": -40, "maximum": 60}},
        "required": ["score", "temp"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 8},
        "note": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["title"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"k": {"type": "string", "maxLength": 4}, "v": {"type": "integer", "minimum": 0,
                                                                                          "maximum": 50}},
        "required": ["k", "v"], "additionalProperties": False}},
}
PROMPTS = ["Hello world!", "The quick brown fox", "def add(a, b):", "Paris is the capital"]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", block_size=4, kv_cache_memory=0.05, max_model_len=1024)


def constrained(so, temperature=0.0, seed=None, max_tokens=400, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, repetition_penalty=1.0,
                          structured_outputs=so, **kw)


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 7)])
def test_every_answer_validates_against_its_schema(llm, name, temperature, seed):
    schema = SCHEMAS[name]
    outs = llm.generate(PROMPTS, constrained({"json": schema}, temperature, seed))
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        check_json(c.text, schema)


def test_json_object_regex_choice_and_grammars(llm):
    cases = [
        ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
        ({"regex": r"[a-z]{3}-[0-9]{2,4}"}, lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", t)),
        ({"choice": ["yes", "no", "it depends"]}, lambda t: t in ("yes", "no", "it depends")),
        ({"grammar": 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'}, lambda t: re.fullmatch(r"\(\d(\+\d)*\)", t)),
        ({"grammar": 'root ::= "ab" ("c" | "d")'}, lambda t: t in ("abc", "abd")),  # GBNF / EBNF
    ]
    for so, ok in cases:
        for temperature, seed in ((0.0, None), (1.0, 3)):
            params = constrained(so, temperature, seed, max_tokens=300)
            if "json_object" in so:
                params = constrained(so, temperature, seed, max_tokens=300, stop_token_ids=None)
            for o in llm.generate(PROMPTS, params):
                c = o.outputs[0]
                if "json_object" in so and c.finish_reason == "length":
                    continue  # an open-ended object may run to max_tokens on noise; checked below
                assert c.finish_reason == "stop" and ok(c.text), (so, c.text)


def test_json_object_is_an_object_when_it_ends(llm):
    # any JSON object: the noise model rarely closes it; the grammar still admits nothing but JSON
    outs = llm.generate(PROMPTS, constrained({"json_object": True}, max_tokens=60))
    for o in outs:
        t = o.outputs[0].text
        assert t.startswith("{")
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(t), dict)


def test_a_finished_grammar_ends_the_sequence_with_stop(llm):
    out = llm.generate("Hi", constrained({"choice": ["alpha", "beta"]}, max_tokens=50))[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    assert len(out.token_ids) < 50


def test_n_samples_each_follow_the_schema(llm):
    schema = SCHEMAS["nested"]
    out = llm.generate("Hello", constrained({"json": schema}, 1.0, 11, n=4))[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        check_json(c.text, schema)
    assert len({c.text for c in out.outputs}) > 1  # n distinct streams, each constrained


def test_seeded_constrained_sampling_is_reproducible(llm):
    p = constrained({"json": SCHEMAS["flat"]}, 1.0, 42)
    a = llm.generate(PROMPTS, p)
    b = llm.generate(PROMPTS[:1], p)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def plain(max_tokens=24):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0, logprobs=1)


def test_plain_requests_unchanged_beside_constrained_ones(llm, monkeypatch):
    alone = [llm.generate(p, plain())[0].outputs[0].token_ids for p in PROMPTS]
    # the grammar machinery present but unused: no mask is computed for a batch without a grammar
    calls = []
    real = structured.apply_masks
    monkeypatch.setattr("qwenrun.engine.sampler.apply_masks", lambda *a: (calls.append(1), real(*a)))
    again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain())]
    assert again == alone and not calls
    # a constrained and an unconstrained request batched together each get what they asked for
    schema = SCHEMAS["array_enum"]
    params = [plain() if i % 2 == 0 else constrained({"json": schema}) for i in range(len(PROMPTS))]
    mixed = llm.generate(PROMPTS, params)
    assert calls  # the constrained rows did use masks
    for i, o in enumerate(mixed):
        if i % 2 == 0:
            assert o.outputs[0].token_ids == alone[i]
        else:
            check_json(o.outputs[0].text, schema)


def test_valid_after_preemption_by_recompute(tiny_dir):
    # 48 blocks of 4 tokens for 8 sequences that each need ~20 blocks: the scheduler must preempt
    small = LLM(str(tiny_dir), dtype="float32", block_size=4, kv_cache_memory=192 * PER_TOKEN / 2**30,
                max_model_len=96, enable_prefix_caching=False)
    schema = SCHEMAS["array_of_objects"]
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
    outs = small.generate(prompts, constrained({"json": schema}, 1.0, 5, max_tokens=80))
    assert small.engine.scheduler.num_preemptions > 0
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            check_json(c.text, schema)
        else:  # ran into the small context: still a prefix the grammar allows
            assert c.finish_reason == "length" and c.text.startswith("[")
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= len(outs) // 2


def test_prefix_caching_and_identical_prompts(llm):
    schema = SCHEMAS["optional"]
    prompt = "same prompt here, long enough to share blocks"
    llm.generate(prompt, plain())  # its blocks stay in the prefix cache
    outs = llm.generate([prompt] * 3, constrained({"json": schema}, 1.0, 9))
    for o in outs:
        check_json(o.outputs[0].text, schema)
    assert any(o.num_cached_tokens for o in outs)


def test_stop_strings_and_logprobs(llm):
    so = {"regex": r"ab(cd|ef)+X[0-9]{3}"}
    out = llm.generate("Hi", constrained(so, max_tokens=200, stop="X", logprobs=2))[0].outputs[0]
    assert out.finish_reason == "stop" and re.fullmatch(r"ab(cd|ef)+", out.text), out.text
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and lp[tok] <= 0.0


def test_compiled_once_per_distinct_constraint(llm):
    comp = llm.engine.structured
    schema = {"type": "object", "properties": {"only_here": {"type": "integer", "minimum": 0, "maximum": 3}},
              "required": ["only_here"], "additionalProperties": False}
    before = comp.num_compiled
    for _ in range(3):
        llm.generate("x", constrained({"json": json.dumps(schema)}, max_tokens=30))
    llm.generate("x", constrained({"json": schema}, max_tokens=30))  # same schema as a dict: same key
    assert comp.num_compiled == before + 1


@pytest.mark.parametrize("so,words", [
    ({"json": {"type": "frobnicate"}}, "frobnicate"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "nowhere"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "a(b"}, "regex"),
    ({"grammar": 'start: "x" ('}, "grammar"),
    ({"choice": []}, "choice"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({"jsonn": {}}, "unknown field"),
    ({"json": 5}, "JSON schema"),
    ({"json": "[1, 2]"}, "JSON schema"),
    ({"json": {"type": "string", "pattern": "a(("}}, "json"),
    ({"json": {"type": "string", "format": "not-a-format"}}, "not-a-format"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"regex": ""}, "regex"),
])
def test_bad_constraints_are_value_errors_naming_the_problem(llm, so, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        llm.generate("x", constrained(so, max_tokens=5))
    assert not llm.engine.has_unfinished_requests()


def test_structured_outputs_params_type():
    p = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+"))
    assert p.structured_outputs.key() == ("regex", "a+")
    assert SamplingParams(structured_outputs={"choice": ["a"]}).structured_outputs.choice == ["a"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_template_without_tools_gets_a_hermes_system_prompt(llm):
    # tests/tiny.py writes Qwen1.5's ChatML template: it has no tools section
    chat = [{"role": "user", "content": "weather in Paris?"}]
    plain_prompt = llm.apply_chat_template(chat)
    with_tools = llm.apply_chat_template(chat, tools=TOOLS)
    assert plain_prompt != with_tools and hermes_system_prompt(TOOLS) in with_tools
    assert '"name": "get_weather"' in with_tools and "<tool_call>" in with_tools
    # earlier calls and their results become tagged text the template can show
    history = chat + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = llm.apply_chat_template(history, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 13)])
def test_forced_tool_calls_have_valid_arguments(llm, choice, temperature, seed):
    chat = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=140)
    out = llm.chat(chat, params, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    content, calls = tool_calls.parse(out.text, set(PARAMS))
    assert content is None and len(calls) == 1
    fn = calls[0]["function"]
    if isinstance(choice, dict):
        assert fn["name"] == "add"
    jsonschema.validate(json.loads(fn["arguments"]), PARAMS[fn["name"]])


def test_bad_tool_choice_is_a_value_error(llm):
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="not among the tools"):
        llm.chat(chat, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat(chat, tool_choice="required")
    with pytest.raises(ValueError, match="tool_choice must be"):
        llm.chat(chat, tools=TOOLS, tool_choice="sometimes")
