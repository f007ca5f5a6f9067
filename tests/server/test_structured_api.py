"""Structured outputs through the official ``openai`` client against a real server over SmolLM2: 20 JSON schemas of
varied shape, json_object, choice and regex on chat and completions, streaming, 400 for a bad schema, and the
metric of steps shared by constrained and free requests."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.engine.test_structured import validate


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _str(n: int = 16) -> dict:
    return {"type": "string", "maxLength": n}


SCHEMAS = {
    "person": _obj({"name": _str(), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "flag": _obj({"enabled": {"type": "boolean"}}),
    "colour": _obj({"colour": {"enum": ["red", "green", "blue"]}}),
    "score": _obj({"score": {"type": "number", "minimum": 0, "maximum": 10}}),
    "tags": _obj({"tags": {"type": "array", "items": _str(10), "minItems": 1, "maxItems": 3}}),
    "point": _obj({"x": {"type": "integer", "minimum": -100, "maximum": 100},
                   "y": {"type": "integer", "minimum": -100, "maximum": 100}}),
    "address": _obj({"street": _str(24), "city": _str(), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "nested": _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "name": _str()})}),
    "deep": _obj({"a": _obj({"b": _obj({"c": {"type": "boolean"}})})}),
    "list_of_objects": _obj({"items": {"type": "array", "items": _obj({"name": _str(10), "qty": {
        "type": "integer", "minimum": 1, "maximum": 9}}), "minItems": 1, "maxItems": 2}}),
    "numbers": _obj({"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                "minItems": 2, "maxItems": 4}}),
    "optional": _obj({"title": _str(), "subtitle": _str()}, required=["title"]),
    "enum_int": _obj({"level": {"enum": [1, 2, 3]}}),
    "status": _obj({"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    "weather": _obj({"city": _str(), "temp_c": {"type": "number", "minimum": -50, "maximum": 60},
                     "sunny": {"type": "boolean"}}),
    "book": _obj({"title": _str(24), "authors": {"type": "array", "items": _str(), "minItems": 1, "maxItems": 2},
                  "year": {"type": "integer", "minimum": 1500, "maximum": 2030}}),
    "matrix": _obj({"rows": {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}),
    "short_word": _obj({"word": {"type": "string", "minLength": 2, "maxLength": 6}}),
    "rating": _obj({"product": _str(), "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                    "recommend": {"type": "boolean"}}),
    "top_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
}


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _ask(name: str, schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON {name.replace('_', ' ')} matching {json.dumps(schema)}"}]


def test_20_json_schemas_parse_and_validate(client):
    assert len(SCHEMAS) == 20

    def one(item):
        name, schema = item
        return client.chat.completions.create(
            model="smollm2", messages=_ask(name, schema), temperature=0, max_tokens=150,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(one, SCHEMAS.items()))
    for (name, schema), out in zip(SCHEMAS.items(), results):
        choice = out.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        validate(json.loads(choice.message.content), schema, name)


def test_json_object(client):
    out = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=100, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON object with the keys name and age of a person."}])
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_choice_and_regex_on_chat_and_completions(client):
    choices = ["positive", "negative", "neutral"]
    chat = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=10, extra_body={"structured_outputs": {"choice": choices}},
        messages=[{"role": "user", "content": "Sentiment of 'I love this phone'?"}])
    assert chat.choices[0].message.content in choices and chat.choices[0].finish_reason == "stop"
    comp = client.completions.create(model="smollm2", prompt="Sentiment of 'awful service':", max_tokens=10,
                                     temperature=0, extra_body={"structured_outputs": {"choice": choices}})
    assert comp.choices[0].text in choices
    pattern = r"[0-9]{3}-[0-9]{4}"
    chat = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=20, extra_body={"structured_outputs": {"regex": pattern}},
        messages=[{"role": "user", "content": "Make up a phone number."}])
    assert re.fullmatch(pattern, chat.choices[0].message.content)
    comp = client.completions.create(model="smollm2", prompt="Call me at", max_tokens=20, temperature=0,
                                     extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, comp.choices[0].text) and comp.choices[0].finish_reason == "stop"


def test_streamed_json_schema_concatenates_to_valid_json(client):
    schema = SCHEMAS["book"]
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=_ask("book", schema), temperature=0, max_tokens=150, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": schema}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    validate(json.loads(text), schema)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "frob"}}}}}},
         "response_format", "frob"),
        ({"structured_outputs": {"regex": "a(("}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ],
)
def test_a_bad_spec_is_a_400_naming_the_problem(server, body, param, needle):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param


def test_constrained_and_free_requests_share_steps(client, server):
    before = server.metrics()

    def constrained():
        return client.chat.completions.create(
            model="smollm2", messages=_ask("person", SCHEMAS["person"]), temperature=0, max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}})

    def free():
        return client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(constrained), pool.submit(free)
        validate(json.loads(a.result().choices[0].message.content), SCHEMAS["person"])
        assert b.result().usage.completion_tokens == 40
    after = server.metrics()
    mixed = "loom_structured_output_mixed_steps_total"
    assert after[mixed] > before.get(mixed, 0)
    assert after["loom_structured_output_seqs_total"] > before.get("loom_structured_output_seqs_total", 0)
    assert after["loom_grammar_cache_hits_total"] > before.get("loom_grammar_cache_hits_total", 0)  # person again
