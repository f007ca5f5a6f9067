"""The Responses API (``/v1/responses``) through the official ``openai`` client: an answer is the chat answer to the
same messages (text, usage, logprobs), streamed events build the same response, reasoning and tool calls become
their items, ``previous_response_id`` continues a stored conversation (its prompt is the chat template's rendering of
the whole conversation), ``text.format`` constrains the output, and what a text-only server cannot take is a 400
naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import orjson
import pytest

from loom.entrypoints.openai.errors import OpenAIError
from loom.entrypoints.openai.protocol import ChatMessage
from loom.entrypoints.openai.response_store import ResponseStore, StoredResponse
from loom.entrypoints.openai.responses_protocol import ResponsesRequest, to_chat
from tests.engine.test_structured import validate
from tests.server.conftest import script_outputs, start_llm_server, tiny_config

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}
CALL_TEXT = ('<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris"}}\n</tool_call>')


def _chat(req: dict, history: list[ChatMessage] = ()) -> list[dict]:
    return [m.as_template_dict() for m in to_chat(ResponsesRequest.model_validate(req), list(history)).messages]


def test_input_items_become_the_chat_messages():
    history = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello.")]
    before = [m.model_dump() for m in history]
    items = [
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "2"},
        {"role": "developer",
         "content": [{"type": "input_text", "text": "Be "}, {"type": "input_text", "text": "terse"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_3", "name": "f", "arguments": '{"x": 2}'},
    ]
    messages = _chat({"model": "m", "input": items, "instructions": "You help."}, history)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    assert messages == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "tool_calls": [call]},  # the call joins the answer before it
        {"role": "tool", "content": "2", "tool_call_id": "call_1"},
        {"role": "system", "content": "Be terse"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": {}}},
            {"id": "call_3", "type": "function", "function": {"name": "f", "arguments": {"x": 2}}}]},
    ]
    assert [m.model_dump() for m in history] == before  # the stored conversation is not changed
    assert _chat({"model": "m", "input": "Hi"}) == [{"role": "user", "content": "Hi"}]


def test_reasoning_effort_reaches_the_chat_request():
    """as the chat route's reasoning_effort: the template's variable (gpt-oss' "Reasoning: high")."""
    req = ResponsesRequest.model_validate({"model": "m", "input": "Hi", "reasoning": {"effort": "high"}})
    assert to_chat(req, []).template_options([], True) == {"reasoning_effort": "high"}


@pytest.mark.parametrize("fields, param, needle", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]}, "input.0.content.0.type",
     "files and audio not at all"),
    ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type", "images go in user messages"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "x"}]}]},
     "input.0.content.0.image_url", "file_id is not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input.0.arguments",
     "JSON object"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id", "call_id"),
    ({"input": []}, "input", "empty"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "function tools only"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice", "tool_choice must be"),
    ({"background": True, "stream": True}, "background", "store true and stream false"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"include": ["message.output_text.logprobs", "nonsense"]}, "include", "nonsense"),
    ({"top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "yaml"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "low, medium or high"),
])
def test_what_cannot_be_taken_is_a_400_naming_the_field(fields, param, needle):
    with pytest.raises(OpenAIError) as caught:
        _chat({"model": "m", "input": "Hi", **fields})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert needle in caught.value.message


def _stored(rid: str, text: str) -> StoredResponse:
    return StoredResponse({"id": rid}, [ChatMessage(role="user", content=text)], [])


def test_the_store_drops_the_oldest_past_either_bound():
    """Each response counts as its JSON, its input items' and its conversation's text: 10 + 2 + n bytes here."""
    assert _stored("a", "xx").num_bytes == len(orjson.dumps({"id": "a"})) + len(b"[]") + 2 == 14
    store = ResponseStore(max_responses=2, max_bytes=33)
    for rid in "abc":
        store.put(_stored(rid, "xx"))
    assert [store.get(r) is not None for r in "abc"] == [False, True, True]  # two at most
    store.put(_stored("d", "x" * 7))  # 14 + 14 + 19 > 33 bytes: b goes; 14 + 19 fits
    assert [store.get(r) is not None for r in "bcd"] == [False, True, True]
    store.put(_stored("e", "x" * 22))  # larger than the whole budget: not kept, nothing dropped for it
    assert store.get("e") is None and len(store) == 2
    store.put(_stored("c", "xx"))  # the same id again replaces it, counted once
    assert store.delete("d") and not store.delete("d")
    store.put(_stored("f", "x" * 7))
    assert [store.get(r) is not None for r in "cf"] == [True, True]
    store.tasks["c"] = None  # c is being made in the background: pinned, f goes instead
    store.put(_stored("g", "xx"))
    assert [store.get(r) is not None for r in "cfg"] == [True, False, True]
    assert ResponseStore(max_responses=0).enabled is False


@pytest.mark.parametrize("before, message, after", [
    ("<think>\nplan it\n</think>", "\n\nHello there!", ""),
    ("", "Sure.", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("", "Hello</s", ""),
])
def test_logprobs_go_with_the_message_text_they_made(tiny_thinker, before, message, after):
    """Token by token, as the engine streams: the message's log-probabilities are its own tokens' (and the end
    token's when the message is last); thinking, tags and a call's tokens are dropped, held-back ones kept."""
    from transformers import AutoTokenizer

    from loom.entrypoints.openai.chat import Answer
    from loom.entrypoints.openai.logprobs import TokenStrings
    from loom.entrypoints.openai.reasoning import REASONING_PARSERS
    from loom.entrypoints.openai.response_events import ResponseEvents
    from loom.entrypoints.openai.tool_parsers import TOOL_PARSERS
    from loom.entrypoints.openai.tools import ToolPlan

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_thinker))
    ids = tokenizer.encode(before + message + after, add_special_tokens=False) + [tokenizer.eos_token_id]
    plan = ToolPlan("auto", parser=TOOL_PARSERS["hermes"])
    choice = Answer(plan, REASONING_PARSERS["qwen3"], with_reasoning=True).stream()
    events = ResponseEvents(TokenStrings(tokenizer))
    for k, token in enumerate(ids):  # token k's log-probability is -k
        so_far = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        events.feed(choice.feed(so_far, final=k == len(ids) - 1), [token], [{token: -float(k)}])
    events.close(cut=False)
    item = next(i for i in events.output if i["type"] == "message")
    assert item["content"][0]["text"] == message

    def upto(text: str) -> int:  # tokens that first make ``text``
        decoded = (tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1))
        return next(k for k, so_far in enumerate(decoded) if so_far.startswith(text))

    first, last = upto(before), len(ids) if not after else upto(before + message)
    assert [-e["logprob"] for e in item["content"][0]["logprobs"]] == [float(k) for k in range(first, last)]


@pytest.fixture(scope="module")
def server(tiny_thinker):
    """The tiny model with single-token thinking tags, the qwen3 reasoning parser and hermes auto tool choice."""
    running = start_llm_server(tiny_config(tiny_thinker, num_kv_blocks=256, reasoning_parser="qwen3",
                                           enable_auto_tool_choice=True, tool_call_parser="hermes"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_a_response_is_the_chat_answer_to_the_same_messages(client):
    kw = {"temperature": 0, "top_logprobs": 2}
    response = client.responses.create(model="tiny", instructions="Be brief.", input="Hi", max_output_tokens=12,
                                       include=["message.output_text.logprobs"], **kw)
    chat = client.chat.completions.create(model="tiny", max_tokens=12, logprobs=True, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], **kw)
    assert response.output_text == chat.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                          chat.usage.completion_tokens)
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    assert (response.incomplete_details is not None) == cut
    assert response.output[-1].status == response.status
    logprobs = response.output[-1].content[0].logprobs
    expected = chat.choices[0].logprobs.content
    assert [(e.token, len(e.top_logprobs)) for e in logprobs] == [(e.token, 2) for e in expected]
    assert [e.logprob for e in logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-5)


def test_streamed_events_build_the_same_response(client, server):
    kw = {"model": "tiny", "input": "Tell me a story.", "max_output_tokens": 16, "temperature": 0}
    client.responses.create(**{**kw, "max_output_tokens": 1})  # both answers below then hit the prefix cache alike
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:  # the client's own reading of the events
        events = list(stream)
    final = events[-1].response  # (get_final_response() takes response.completed only; this one may be cut)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == f"response.{whole.status}" and final.output_text == whole.output_text
    assert [(i.type, i.status) for i in final.output] == [(i.type, i.status) for i in whole.output]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    with httpx.stream("POST", f"{server.base_url}/responses", json={**kw, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    assert names == [json.loads(line.removeprefix("data: "))["type"] for line in lines[1::2]]


def test_reasoning_and_tool_calls_become_items(client, server, monkeypatch):
    ids = script_outputs(server, monkeypatch)(CALL_TEXT)
    kw = {"model": "tiny", "input": "Weather in Paris?", "tools": [WEATHER], "max_output_tokens": 64}
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    end = server.component.front.tokenizer.convert_tokens_to_ids("</think>")
    for response in (whole, final):
        assert [item.type for item in response.output] == ["reasoning", "function_call"]
        assert response.output[0].content[0].text == "\nNeed the weather.\n"
        call = response.output[1]
        assert (call.name, json.loads(call.arguments), call.call_id.startswith("call_")) == (
            "get_weather", {"city": "Paris"}, True)
        assert response.usage.output_tokens_details.reasoning_tokens == ids.index(end) + 1
    pieces = {kind: "".join(e.delta for e in events if e.type == kind) for kind in
              ("response.reasoning_text.delta", "response.function_call_arguments.delta")}
    assert pieces == {"response.reasoning_text.delta": "\nNeed the weather.\n",
                      "response.function_call_arguments.delta": final.output[1].arguments}


def test_a_call_cut_short_is_the_same_item_streamed_or_not_and_the_next_turn_goes_on(client, server, monkeypatch):
    ids = script_outputs(server, monkeypatch)(CALL_TEXT)
    kw = {"model": "tiny", "input": "Weather in Paris?", "tools": [WEATHER], "max_output_tokens": len(ids) - 8}
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        final = list(stream)[-1].response
    for response in (whole, final):
        assert response.status == "incomplete"
        assert [(i.type, i.status) for i in response.output] == [("reasoning", "completed"),
                                                                 ("function_call", "incomplete")]
    assert whole.output[1].arguments == final.output[1].arguments and whole.output[1].arguments.startswith('{"city')
    after = client.responses.create(model="tiny", previous_response_id=whole.id, input="Try again.",
                                    max_output_tokens=4)  # the cut call is left out of the history
    assert after.status in ("completed", "incomplete")
    items = client.responses.input_items.list(whole.id)
    assert [(i.type, i.role, i.content[0].type, i.content[0].text) for i in items.data] == [
        ("message", "user", "input_text", "Weather in Paris?")]  # a string input, listed as an input_text part
    assert whole.tool_choice == "auto" and whole.tools[0].name == "get_weather"


def _tokens(server, messages: list[dict], tools=None) -> int:
    body = {"model": "tiny", "messages": messages, **({"tools": tools} if tools else {})}
    return httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()["count"]


def test_previous_response_id_continues_the_stored_conversation(client, server, monkeypatch):
    first = client.responses.create(model="tiny", instructions="Be brief.", input="Hi", max_output_tokens=6)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input="And then?",
                                     max_output_tokens=6)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "And then?"}]  # instructions are not carried over
    assert second.usage.input_tokens == _tokens(server, conversation)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    items = client.responses.input_items.list(second.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "And then?")]

    script_outputs(server, monkeypatch)(CALL_TEXT)  # a call, answered in the next turn
    called = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=64)
    call = called.output[1]
    answered = client.responses.create(model="tiny", previous_response_id=called.id, tools=[WEATHER],
                                       max_output_tokens=64,
                                       input=[{"type": "function_call_output", "call_id": call.call_id,
                                               "output": "sunny"}])
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    assert answered.usage.input_tokens == _tokens(server, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])

    client.responses.delete(first.id)
    for attempt in (lambda: client.responses.retrieve(first.id),
                    lambda: client.responses.create(model="tiny", previous_response_id=first.id, input="x")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    unstored = client.responses.create(input="Hi", max_output_tokens=2, store=False)  # no model: the served one
    assert unstored.model == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_json_schema_format_holds_the_output_to_it(client, server):
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 10}, "warm": {"type": "boolean"}},
              "required": ["city", "warm"], "additionalProperties": False}
    think = str(server.component.front.tokenizer.convert_tokens_to_ids("<think>"))
    response = client.responses.create(model="tiny", input="A city?", max_output_tokens=200, temperature=1.0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
                                       extra_body={"seed": 3, "logit_bias": {think: -100}})
    # (Loom's sampling extras pass through; qwen3's rule lets a first <think> open a block before the grammar, and a
    # random model would think on until max_output_tokens)
    assert response.status == "completed"
    validate(json.loads(response.output_text), schema, "city")


@pytest.mark.parametrize("body, status, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
     "input.0.content.0.type"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400, "text.format"),
    ({"model": "other"}, 404, "model"),
    ({"priority": -1}, 400, "priority"),  # vLLM's extra, passed through: this server schedules first come first served
    ({"tools": [{"type": "function", "name": ""}]}, 400, "tools.0.name"),
    ({"input": "word " * 5000}, 400, "input"),  # over the context
])
def test_bad_requests_over_http(server, body, status, param):
    r = httpx.post(f"{server.base_url}/responses", json={"model": "tiny", "input": "Hi", **body}, timeout=30)
    assert (r.status_code, r.json()["error"]["param"]) == (status, param)
    assert "max_tokens" not in r.json()["error"]["message"]


def _engine_is_idle(server) -> None:
    """No request left in the engine: its aborts applied, every KV block back (waits for the engine thread)."""
    import time

    deadline = time.time() + 10
    while time.time() < deadline:
        values = server.metrics()
        if (values["loom_num_requests_running"] == 0
                and values["loom_kv_cache_free_blocks"] == values["loom_kv_cache_num_blocks"]):
            break
        time.sleep(0.05)
    assert values["loom_num_requests_running"] == 0
    assert values["loom_kv_cache_free_blocks"] == values["loom_kv_cache_num_blocks"]
    assert server.component.front.num_in_flight == 0 and not server.component.context.responses.tasks


def test_a_background_response_is_read_as_it_is_made_and_can_be_cancelled(client, server, monkeypatch):
    import time

    kw = {"model": "tiny", "input": "Tell me a story.", "max_output_tokens": 8, "temperature": 0}
    started = client.responses.create(**kw, background=True)
    assert started.status == "in_progress" and started.background and started.output == []
    deadline = time.time() + 60
    while (done := client.responses.retrieve(started.id)).status == "in_progress" and time.time() < deadline:
        time.sleep(0.02)
    assert done.status == "incomplete", done
    assert done.output_text == client.responses.create(**kw).output_text and done.usage.output_tokens == 8
    assert client.responses.cancel(started.id).status == "incomplete"  # finished: returned as it is

    script_outputs(server, monkeypatch)("word " * 400)  # long enough to be cancelled on the way
    long = client.responses.create(model="tiny", input="Go on.", max_output_tokens=400, background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
    assert client.responses.cancel(long.id).status == "cancelled"  # again: the same, as OpenAI's
    _engine_is_idle(server)
    deleted = client.responses.create(model="tiny", input="Go on.", max_output_tokens=400, background=True)
    client.responses.delete(deleted.id)  # stops it too: it is not stored again when it would have finished
    _engine_is_idle(server)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(deleted.id)
    for extra in ({"stream": True}, {"store": False}):
        r = httpx.post(f"{server.base_url}/responses", json={**kw, "background": True, **extra}, timeout=30)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "background")
