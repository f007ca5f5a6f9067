"""Tool calling through the official ``openai`` client against real servers: named and "required" tool_choice give
calls whose arguments validate against the function's schema (SmolLM2, and a tiny random model: whatever the model),
streamed or not; a history with assistant tool_calls and tool replies continues; "auto" is a 400 naming the flags
without them, and with ``--tool-call-parser hermes`` finds the call in the text (the output forced by a regex, so
the real parser path runs deterministically); bad tools are 400s naming the field."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.engine.test_structured import validate
from tests.server.conftest import start_llm_server, tiny_config
from tests.server.test_tool_parsers import reassemble


def _function(name: str, properties: dict, description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


WEATHER = _function("get_weather", {"city": {"type": "string", "maxLength": 20},
                                    "unit": {"enum": ["celsius", "fahrenheit"]}}, "Current weather in a city")
TIME = _function("get_time", {"timezone": {"type": "string", "maxLength": 24}}, "Current time in a time zone")
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def smol(smollm2_server):
    """SmolLM2 without any tool flag: named and "required" need none."""
    return smollm2_server


@pytest.fixture(scope="module")
def hermes(tiny_llama):
    """The tiny random model with auto tool choice and the hermes parser."""
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=128, tool_call_parser="hermes",
                                          enable_auto_tool_choice=True))
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def smol_client(smol):
    with _client(smol) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_client(hermes):
    with _client(hermes) as c:
        yield c


def _valid_calls(calls, names=tuple(SCHEMAS)) -> list[str]:
    """Each call's arguments parse and validate against its function's schema; the names, in order."""
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name], call.function.name)
    return [call.function.name for call in calls]


def _streamed(chunks) -> tuple[str, list[tuple[str, str]], list[str | None], object]:
    """(content, [(name, arguments)], finish reasons, usage) of a stream, its deltas checked by ``reassemble``."""
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    content, calls = reassemble(deltas)
    return content, calls, [c.choices[0].finish_reason for c in chunks if c.choices], chunks[-1].usage


def test_named_tool_choice_gives_a_valid_call(smol_client):
    out = smol_client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                              temperature=0, max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert _valid_calls(choice.message.tool_calls) == ["get_weather"]
    assert out.usage.completion_tokens > 0


def test_named_tool_choice_streams_the_arguments_in_pieces(smol_client):
    chunks = list(smol_client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=60, stream=True,
        stream_options={"include_usage": True}))
    content, calls, reasons, usage = _streamed(chunks)
    assert content == "" and [name for name, _ in calls] == ["get_weather"]
    validate(json.loads(calls[0][1]), SCHEMAS["get_weather"])
    pieces = [d.function.arguments for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len([p for p in pieces if p]) > 3  # streamed as it was generated, not at the end
    assert reasons[-1] == "tool_calls" and usage.completion_tokens > 0


def test_required_gives_valid_calls_of_the_given_tools(smol_client):
    out = smol_client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=0, max_tokens=120)
    assert out.choices[0].finish_reason == "tool_calls"
    assert len(_valid_calls(out.choices[0].message.tool_calls)) >= 1
    one = smol_client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(_valid_calls(one.choices[0].message.tool_calls)) == 1
    cut = smol_client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=0, max_tokens=15).choices[0]  # stops inside the arguments
    assert cut.finish_reason == "length" and cut.message.content is None  # the call as a stream would have sent it
    (call,) = cut.message.tool_calls
    whole = out.choices[0].message.tool_calls[0].function  # the same greedy call, not cut
    assert call.function.name == whole.name == "get_weather"
    assert '{"city"' in call.function.arguments and whole.arguments.startswith(call.function.arguments)
    assert len(call.function.arguments) < len(whole.arguments)


HISTORY = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"time": "18:04"}'},
]


def test_a_history_with_calls_and_tool_replies_continues(smol_client, smol):
    out = smol_client.chat.completions.create(model="smollm2", messages=HISTORY, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=24)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason in ("stop", "length")
    # SmolLM2's template ignores tools: they, the calls and the replies are written in the Hermes format.
    ids = httpx.post(f"{smol.url}/tokenize", json={"messages": HISTORY, "tools": TOOLS}, timeout=30).json()["tokens"]
    prompt = httpx.post(f"{smol.url}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert prompt.count("<tool_response>") == 2 and prompt.count('<tool_call>\n{"name": "get_') == 2
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt


@pytest.mark.parametrize("choice", [{}, {"tool_choice": "auto"}], ids=["default", "auto"])
def test_auto_without_the_flags_is_a_400_naming_them(smol, choice):
    r = httpx.post(f"{smol.base_url}/chat/completions", timeout=30,
                   json={"model": "smollm2", "messages": ASK, "tools": TOOLS, **choice})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in error["message"] and "--tool-call-parser" in error["message"]


BAD = {"type": "object", "properties": {"a": {"type": "frob"}}}


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "function"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name",
         "missing"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools.0.function.parameters", "type: object"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "'nope'"),
        ({"tools": [_function("f", {"a": {"type": "frob"}}, "")], "tool_choice": "required"}, "tools", "frob"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'always'"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "tools", "get_weather"),
        ({"tools": [_function(f"f{i}", {}, "") for i in range(129)], "tool_choice": "none"}, "tools", "128"),
        ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice",
         "response_format"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ],
    ids=["type", "no_name", "not_object_schema", "unknown_function", "bad_schema", "no_tools", "bad_choice",
         "duplicate", "too_many", "with_response_format", "bad_history_arguments"],
)
def test_bad_tools_are_400s_naming_the_field(smol, body, param, needle):
    r = httpx.post(f"{smol.base_url}/chat/completions", timeout=60,
                   json={"model": "smollm2", "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
FORCED = f"Let me check. <tool_call>\n{CALL}\n</tool_call>"


def _forced(client, text: str, **kw):
    """A chat request whose output the tiny model is forced to write (a regex of the exact text)."""
    return client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                          extra_body={"structured_outputs": {"regex": re.escape(text)}}, **kw)


def test_auto_with_the_hermes_parser_finds_the_call(tiny_client):
    out = _forced(tiny_client, FORCED, logprobs=True)
    choice = out.choices[0]
    assert choice.message.content == "Let me check. " and choice.finish_reason == "tool_calls"
    assert _valid_calls(choice.message.tool_calls) == ["get_weather"]
    assert choice.message.tool_calls[0].function.arguments == '{"city": "Paris", "unit": "celsius"}'
    assert len(choice.logprobs.content) == out.usage.completion_tokens


def test_auto_streams_content_then_the_call(tiny_client):
    chunks = list(_forced(tiny_client, FORCED, stream=True, stream_options={"include_usage": True}, logprobs=True))
    content, calls, reasons, usage = _streamed(chunks)
    assert content == "Let me check. " and reasons[-1] == "tool_calls"
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == usage.completion_tokens  # every token's logprob, held-back text or not


def test_auto_without_a_call_and_parallel_calls_off(tiny_client):
    plain = _forced(tiny_client, "It is sunny.").choices[0]
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == ("It is sunny.", None, "stop")
    two = f"<tool_call>{CALL}</tool_call><tool_call>{CALL.replace('Paris', 'Rome')}</tool_call>"
    assert len(_forced(tiny_client, two).choices[0].message.tool_calls) == 2
    one = _forced(tiny_client, two, parallel_tool_calls=False).choices[0].message.tool_calls
    assert len(one) == 1 and "Paris" in one[0].function.arguments


def test_a_random_model_still_gives_valid_calls(tiny_client):
    """The constraint, not the model, makes named and "required" calls valid (streamed here)."""
    for choice in (NAMED, "required"):
        chunks = list(tiny_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                          temperature=1.0, seed=7, max_tokens=120, stream=True))
        content, calls, reasons, _ = _streamed(chunks)
        assert content == "" and calls and reasons[-1] == "tool_calls"
        for name, arguments in calls:
            validate(json.loads(arguments), SCHEMAS[name], name)
