"""Structured output through the clients applications use, against the real ``qwenrun serve``
on the demo model (Qwen2.5-Coder-0.5B-Instruct, int8): the openai SDK's ``parse``, instructor in
TOOLS and JSON_SCHEMA modes, LangChain's ``with_structured_output`` (json_schema and
function_calling), streamed where the client streams; vLLM's extra fields; the 400s for bad
constraints; and forced tool calls on a template without tools (Qwen1.5-Chat's ChatML)."""
from __future__ import annotations

import json
import re

import httpx
import instructor
import jsonschema
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from test_server import ServerProcess, sse_events

pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str
    country: str
    population_millions: float = Field(ge=0, le=100)
    landmarks: list[str] = Field(max_length=3)


class Weather(BaseModel):
    city: str
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


ASK = [{"role": "user", "content": "Describe Paris, France as JSON: name, country, population in millions, "
                                   "and up to three landmarks."}]
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
WEATHER_Q = [{"role": "user", "content": "What's the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(["demo", "--quantization", "int8", "--max-model-len", "4096", "--kv-cache-memory", "0.5"],
                      tmp_path_factory.mktemp("log") / "demo_structured.log")
    try:
        s.wait_ready(300)
        yield s
    finally:
        s.stop()


def client_of(s: ServerProcess):
    return s.client(timeout=900)  # the CPU may be shared: slow, never wrong


def check_city(c: City) -> None:
    assert isinstance(c, City) and c.name and c.country and len(c.landmarks) <= 3
    assert 0 <= c.population_millions <= 100


# -- the openai SDK ---------------------------------------------------------------------------------
def test_openai_parse_with_a_pydantic_model(srv):
    client = client_of(srv)
    r = client.chat.completions.parse(model="demo", messages=ASK, response_format=City, temperature=0, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "stop"
    check_city(ch.message.parsed)
    # streamed: the SDK's stream helper parses the accumulated content
    with client.chat.completions.stream(model="demo", messages=ASK, response_format=City, temperature=0,
                                        max_tokens=200) as stream:
        final = stream.get_final_completion()
    check_city(final.choices[0].message.parsed)
    # (not compared with the non-streamed answer: the second request hits the prefix cache, and
    # with int8 weights a cached prefill may change greedy tokens; so it does without a schema)


def test_json_object_and_seeded_sampling_validate(srv):
    client = client_of(srv)
    schema = City.model_json_schema()
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="demo", messages=ASK, temperature=0.8, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    simple = [{"role": "user", "content": "Give a JSON object with the keys city and country for Paris."}]
    r = client.chat.completions.create(model="demo", messages=simple, temperature=0, max_tokens=100,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# -- instructor ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor(srv, mode):
    client = instructor.from_openai(client_of(srv), mode=mode)
    city = client.chat.completions.create(model="demo", response_model=City, messages=ASK, temperature=0,
                                          max_tokens=200, max_retries=1)
    check_city(city)
    # streamed: instructor's partial objects, the last one whole
    last = None
    for last in client.chat.completions.create_partial(model="demo", response_model=City, messages=ASK,
                                                       temperature=0, max_tokens=200, max_retries=1):
        pass
    check_city(City.model_validate(last.model_dump()))


# -- LangChain ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(srv, method):
    llm = ChatOpenAI(model="demo", base_url=srv.url + "/v1", api_key="unused", temperature=0, max_tokens=200,
                     max_retries=0, timeout=900)
    structured = llm.with_structured_output(City, method=method)
    city = structured.invoke(ASK[0]["content"])
    check_city(city)
    chunks = list(structured.stream(ASK[0]["content"]))
    assert chunks
    final = chunks[-1]
    check_city(final if isinstance(final, City) else City.model_validate(final))


# -- forced tool calls ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(srv, stream):
    client = client_of(srv)
    for choice, want in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        kw = dict(model="demo", messages=WEATHER_Q, tools=WEATHER_TOOLS, tool_choice=choice, temperature=0,
                  max_tokens=120, parallel_tool_calls=False)
        if not stream:
            ch = client.chat.completions.create(**kw).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls]
            content, finish = ch.message.content, ch.finish_reason
        else:
            parts: dict[int, list[str]] = {}
            content, finish = "", None
            for chunk in client.chat.completions.create(**kw, stream=True):
                d = chunk.choices[0].delta
                content += d.content or ""
                for tc in d.tool_calls or []:
                    p = parts.setdefault(tc.index, ["", ""])
                    p[0] += tc.function.name or ""
                    p[1] += tc.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            calls = [tuple(parts[i]) for i in sorted(parts)]
            content = content or None
        assert len(calls) == 1 and not content
        name, args = calls[0]
        assert name == (want or "get_weather")
        jsonschema.validate(json.loads(args), PARAMS[name])
        # OpenAI and vLLM: a call forced by name ends with "stop", "required" with "tool_calls"
        assert finish == ("stop" if want else "tool_calls")


def test_vllm_structured_outputs_and_guided_fields(srv):
    client = client_of(srv)
    base = dict(model="demo", messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
                temperature=0, max_tokens=30)
    r = client.chat.completions.create(**base, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(**base, extra_body={"guided_choice": ["Yes", "No"]})
    assert r.choices[0].message.content in ("Yes", "No")
    r = client.chat.completions.create(**{**base, "messages": [{"role": "user", "content": "Give a US phone number."}]},
                                       extra_body={"guided_regex": r"[0-9]{3}-[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{3}-[0-9]{4}", r.choices[0].message.content)
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"},
                                               "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    r = client.chat.completions.create(**{**base, "max_tokens": 60}, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(**base, extra_body={"guided_grammar": 'root ::= "Answer: " ("yes" | "no")'})
    assert r.choices[0].message.content in ("Answer: yes", "Answer: no")
    # completions take the same fields
    r = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"choice": [" Paris", " Lyon"]}})
    assert r.choices[0].text in (" Paris", " Lyon")


def test_streamed_json_schema_concatenates_to_a_valid_object(srv):
    body = {"model": "demo", "messages": ASK, "temperature": 0, "max_tokens": 200, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": City.model_json_schema()}}}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=900) as r:
        assert r.status_code == 200
        events = sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    check_city(City.model_validate_json(text))
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_constrained_and_plain_requests_together(srv):
    import concurrent.futures as cf

    client = client_of(srv)
    plain = dict(model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
                 temperature=0, max_tokens=20)
    alone = client.chat.completions.create(**plain).choices[0].message.content
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(client.chat.completions.parse, model="demo", messages=ASK, response_format=City,
                            temperature=0, max_tokens=200) for _ in range(2)]
        futs += [pool.submit(client.chat.completions.create, **plain) for _ in range(2)]
        res = [f.result() for f in futs]
    for r in res[:2]:
        check_city(r.choices[0].message.parsed)
    for r in res[2:]:
        assert r.choices[0].message.content == alone


# -- the mission's model's template: no tools section -------------------------------------------------
@pytest.fixture(scope="module")
def chatml_srv(tmp_path_factory):
    """The demo weights with Qwen1.5-Chat's template (ChatML, no tools): a GGUF without its
    template gets the ChatML fallback."""
    from qwenrun.chat_template import CHATML_FALLBACK

    tpl = tmp_path_factory.mktemp("tpl") / "chatml.jinja"
    tpl.write_text(CHATML_FALLBACK)
    s = ServerProcess(["demo", "--quantization", "int8", "--max-model-len", "4096", "--kv-cache-memory", "0.3",
                       "--chat-template", str(tpl)], tmp_path_factory.mktemp("log") / "demo_chatml.log")
    try:
        s.wait_ready(300)
        yield s
    finally:
        s.stop()


def test_forced_calls_on_a_template_without_tools(chatml_srv):
    client = client_of(chatml_srv)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        ch = client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=WEATHER_TOOLS, tool_choice=choice,
                                            temperature=0, max_tokens=120, parallel_tool_calls=False).choices[0]
        (call,) = ch.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    # auto: the tools are described in the system prompt, so the model can call on its own
    ch = client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=WEATHER_TOOLS, temperature=0,
                                        max_tokens=120).choices[0]
    assert ch.message.tool_calls or ch.message.content


# -- bad input: 400s naming the problem ----------------------------------------------------------------
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format", "frob"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": WEATHER_TOOLS, "tool_choice": "always"}, "tool_choice", "always"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "unknown field"),
    ({"guided_grammar": 'start: "x" ('}, "guided_grammar", "grammar"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "one output constraint"),
]


@pytest.mark.parametrize("extra,param,words", BAD)
def test_bad_constraints_are_400s(srv, extra, param, words):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
