"""Reasoning outputs (``--reasoning-parser``): the split of ``<think>`` text into reasoning and content, streamed
in any pieces, equals the split of the whole text; through the server with a tiny model forced (by a regex) to write
a thinking block, in chat answers and streams, beside tool calls; ``chat_template_kwargs`` reach the template."""

from __future__ import annotations

import random

import pytest

from loom.entrypoints.openai.reasoning import HARMONY_MARKERS, REASONING_PARSERS

CASES = [  # text, qwen3 (reasoning, content), deepseek_r1 (reasoning, content)
    ("<think>\nplan it\n</think>\n\nHello!", ("\nplan it\n", "\n\nHello!"), ("\nplan it\n", "\n\nHello!")),
    ("Hello!", (None, "Hello!"), ("Hello!", None)),
    ("plan it</think>Hello", (None, "plan it</think>Hello"), ("plan it", "Hello")),
    ("<think>cut short by max_tokens", ("cut short by max_tokens", None), ("cut short by max_tokens", None)),
    ("<think></think>answer", (None, "answer"), (None, "answer")),
    ("<thin", (None, "<thin"), ("<thin", None)),
    ("<think>a < b </thin but </think>x</think>", ("a < b </thin but ", "x</think>"),
     ("a < b </thin but ", "x</think>")),
]


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_a_whole_output_splits_as_vllms_parser_of_that_name(name, case):
    text, qwen3, deepseek = case
    assert REASONING_PARSERS[name].split(text) == (qwen3 if name == "qwen3" else deepseek)


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_any_streamed_pieces_give_the_whole_outputs_split_and_never_split_a_tag(name):
    parser = REASONING_PARSERS[name]
    rng = random.Random(0)
    for text, *_ in CASES:
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
            stream, reasoning, content = parser.stream(), "", None
            for end in [*cuts, len(text)]:
                piece, content = stream.feed(text[:end], final=end == len(text))
                assert "<think>" not in piece and "</think>" not in piece
                assert not any(piece.endswith(parser.end[:n]) for n in range(2, len(parser.end))) or end == len(text)
                reasoning += piece
            assert (reasoning or None, content or None) == parser.split(text), (text, cuts)


HARMONY_CASES = [  # text (gpt-oss' output after its prompt's "<|start|>assistant"), (reasoning, content)
    ("<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
     ("User says hi.", "Hello!")),
    ("<|channel|>analysis<|message|>cut short by max_tok", ("cut short by max_tok", None)),
    ("<|channel|>final<|message|>No thinking: a < b <| c", (None, "No thinking: a < b <| c")),
    ("<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|> two<|end|>"
     "<|start|>assistant<|channel|>commentary<|message|>Looking it up. <|end|><|start|>assistant<|channel|>final"
     "<|message|>Done.", ("one two", "Looking it up. Done.")),  # a preamble (commentary to no one) is content
    ("<|channel|>analysis<|message|>call it<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
     "<|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",  # a function's message: a hermes call
     ("call it", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')),
    ("<|channel|>analysis to=browser.search<|message|>{\"q\": \"x\"}<|call|>", (None, None)),  # a built-in tool's
    ("Plain text without the format", (None, "Plain text without the format")),
    ("<|channel|>analysis<|mess", (None, None)),
]


@pytest.mark.parametrize("case", HARMONY_CASES, ids=range(len(HARMONY_CASES)))
def test_gpt_oss_channels_split_into_reasoning_and_content(case):
    text, expected = case
    assert REASONING_PARSERS["gpt_oss"].split(text) == expected


def test_gpt_oss_streamed_pieces_give_the_whole_outputs_split_and_never_show_a_marker():
    parser = REASONING_PARSERS["gpt_oss"]
    rng = random.Random(1)
    for text, _ in HARMONY_CASES:
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            stream, reasoning, content, contents = parser.stream(), "", None, []
            for end in [*cuts, len(text)]:
                piece, content = stream.feed(text[:end], final=end == len(text))
                assert not any(m in piece + (content or "") for m in HARMONY_MARKERS)
                reasoning += piece
                contents.append(content or "")
            assert all(b.startswith(a) for a, b in zip(contents, contents[1:]))  # content only grows
            assert (reasoning or None, content or None) == parser.split(text), (text, cuts)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    from tests.server.conftest import start_llm_server, tiny_config

    running = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, reasoning_parser="qwen3",
                                           enable_auto_tool_choice=True, tool_call_parser="hermes"))
    yield running
    running.stop()


@pytest.fixture
def scripted(server, monkeypatch):
    """The engine writes a given text (``script_outputs``): a random tiny model never writes a thinking block."""
    from tests.server.conftest import script_outputs

    return script_outputs(server, monkeypatch)


def _chat(server, **body):
    import httpx

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, **body}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)


def _streamed(server, **body) -> tuple[str, str, list[dict]]:
    import json

    import httpx

    reasoning, content, deltas = "", "", []
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
                            "stream": True, **body}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    delta = choice["delta"]
                    deltas.append(delta)
                    reasoning += delta.get("reasoning_content") or ""
                    content += delta.get("content") or ""
    return reasoning, content, deltas


def test_a_thinking_answer_is_split_in_the_message_and_in_the_stream(server, scripted):
    scripted("<think>\nThe user says hi.\n</think>\n\nHello there!")
    message = _chat(server).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("\nThe user says hi.\n", "\n\nHello there!")
    reasoning, content, deltas = _streamed(server)
    assert (reasoning, content) == ("\nThe user says hi.\n", "\n\nHello there!")
    assert not any("think>" in (d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas)
    scripted("Hello without thinking.")  # qwen3's rule: no block opened, all content
    message = _chat(server).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (None, "Hello without thinking.")


def assert_weather_call(server, reasoning: str, content=None, max_tokens: int = 64) -> None:
    """The scripted answer is ``reasoning``, then get_weather(city="Paris"), in the message and in the stream."""
    choice = _chat(server, tools=TOOLS, max_tokens=max_tokens).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (reasoning, content)
    call = choice["message"]["tool_calls"][0]["function"]
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Paris"}')
    streamed, _, deltas = _streamed(server, tools=TOOLS, max_tokens=max_tokens)
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert streamed == reasoning and [c["function"]["name"] for c in calls if c["function"].get("name")] == [
        "get_weather"]
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city": "Paris"}'


def test_a_tool_call_after_the_thinking_block_is_parsed_from_the_content(server, scripted):
    scripted('<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
             '"arguments": {"city": "Paris"}}\n</tool_call>')
    assert_weather_call(server, "\nNeed the weather.\n")


def test_a_gpt_oss_answer_and_its_tool_call_are_split_in_the_message_and_in_the_stream(tiny_llama, monkeypatch):
    """--reasoning-parser gpt_oss with --tool-call-parser openai (as vLLM serves gpt-oss)."""
    from tests.server.conftest import script_outputs, start_llm_server, tiny_config

    running = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=64, reasoning_parser="gpt_oss",
                                           enable_auto_tool_choice=True, tool_call_parser="openai"))
    try:
        script = script_outputs(running, monkeypatch)
        text, expected = HARMONY_CASES[0]
        script(text)
        message = _chat(running).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == expected
        reasoning, content, deltas = _streamed(running)
        assert (reasoning, content) == expected
        assert not any("<|" in (d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas)

        script(HARMONY_CASES[4][0])  # analysis, then a message to functions.get_weather
        assert_weather_call(running, "call it")
    finally:
        running.stop()


def test_the_openai_tool_parser_needs_the_gpt_oss_reasoning_parser(tiny_llama):
    from tests.server.conftest import tiny_config

    with pytest.raises(ValueError, match="add --reasoning-parser gpt_oss"):
        tiny_config(tiny_llama, enable_auto_tool_choice=True, tool_call_parser="openai")


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if not (loop.last and "
            "continue_final_message) %}</{{ m['role'] }}>{% endif %}{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
            "{% if mode is defined %}{{ 'mode: ' + mode }}{% endif %}"
            "{% if reasoning_effort is defined %}{{ 'Reasoning: ' + reasoning_effort }}{% endif %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
            "{% if messages[0]['role'] == 'system' and messages[0]['content'] == 'refuse' %}"
            "{{ raise_exception('system prompts are not allowed') }}{% endif %}")


def test_chat_template_kwargs_and_continue_final_message_reach_the_template(server, monkeypatch):
    import httpx

    monkeypatch.setattr(server.component.front.tokenizer, "chat_template", TEMPLATE)

    def rendered(**body):
        r = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}], **body})
        assert r.status_code == 200, r.text
        return httpx.post(f"{server.url}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]

    assert rendered() == "<user>Hi</user><assistant>"
    assert rendered(chat_template_kwargs={"enable_thinking": False}) == "<user>Hi</user><think></think><assistant>"
    # OpenAI's reasoning_effort reaches the template as gpt-oss' reads it; chat_template_kwargs' own value wins
    assert rendered(reasoning_effort="high") == "<user>Hi</user>Reasoning: high<assistant>"
    assert rendered(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "low"}) == (
        "<user>Hi</user>Reasoning: low<assistant>")
    two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    assert rendered(messages=two, add_generation_prompt=False, continue_final_message=True) == (
        "<user>Hi</user><assistant>Hel")
    for body, param in (({"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs"),
                        ({"chat_template_kwargs": {"self": 1, "conversations": []}}, "chat_template_kwargs"),
                        ({"chat_template_kwargs": {"enable_thinking": False, "mode": 3}}, "messages"),
                        ({"continue_final_message": True}, "continue_final_message"),
                        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
                        ({"messages": [{"role": "system", "content": "refuse"}]}, "messages")):
        r = _chat(server, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "not allowed" in _chat(server, messages=[{"role": "system", "content": "refuse"}]).json()["error"][
        "message"]


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


def test_a_grammar_starts_after_the_thinking_block(tiny_thinker):
    """A tokenizer with the tags as single tokens (the engine can gate), deepseek_r1 (the output starts inside the
    block): the end tag, pushed first by logit_bias, closes the block; response_format shapes the content after it,
    in the message and in the stream (it used to be one string, tag and JSON, in content)."""
    import json

    from tests.server.conftest import start_llm_server, tiny_config

    running = start_llm_server(tiny_config(tiny_thinker, num_kv_blocks=128, reasoning_parser="deepseek_r1"))
    try:
        assert running.component.context.think is not None
        body = {"logit_bias": {"49153": 100}, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
        choice = _chat(running, **body).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["reasoning_content"] is None
        assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
        reasoning, content, _ = _streamed(running, **body)
        assert reasoning == "" and content == choice["message"]["content"]
        # a prompt that closes the block itself (a prefilled answer): the grammar from the first token, and the
        # answer is all content, though deepseek_r1's rule alone would call it reasoning
        prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>easy</think>"}]
        choice = _chat(running, messages=prefill, add_generation_prompt=False, continue_final_message=True,
                       **{**body, "logit_bias": None}).json()["choices"][0]
        assert choice["message"]["reasoning_content"] is None
        assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
    finally:
        running.stop()


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1", "deepseek_v3"])
def test_the_prompts_last_tag_sets_where_an_answer_starts(name):
    parser = REASONING_PARSERS[name]
    assert parser.after_prompt("done") is None  # a closed block: all content
    assert parser.after_prompt("open").split("plan</think>answer") == ("plan", "answer")  # starts inside it
    assert parser.after_prompt(None) is parser


@pytest.mark.parametrize("reasoning,tools,answer", [
    ("glm45", "glm45", "<think>Need the weather.</think><tool_call>get_weather\n<arg_key>city</arg_key>\n"
                       "<arg_value>Paris</arg_value>\n</tool_call>"),
    ("deepseek_v3", "deepseek_v31", "<think>Need the weather.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                                    'get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
                                    "<｜tool▁calls▁end｜>"),
], ids=["glm45", "deepseek-v31"])  # fmt: skip
def test_an_answer_thinks_then_calls_in_its_models_own_format(tiny_llama, monkeypatch, reasoning, tools, answer):
    """As vLLM serves GLM-4.5 (--reasoning-parser glm45 --tool-call-parser glm45: a call whose arguments are
    <arg_key>/<arg_value> pairs, typed by the request's tools) and DeepSeek-V3.1 (deepseek_v3, deepseek_v31: a prompt
    without a tag, so the answer opens its block; the call's tokens wrapped in the calls' begin and end tokens): the
    thinking block, then the call, in the message and the stream."""
    from tests.server.conftest import script_outputs, start_llm_server, tiny_config

    running = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=64, reasoning_parser=reasoning,
                                           enable_auto_tool_choice=True, tool_call_parser=tools))
    try:
        script_outputs(running, monkeypatch)(answer)
        assert_weather_call(running, "Need the weather.", max_tokens=200)  # DeepSeek's tokens: many of SmolLM2's
    finally:
        running.stop()
