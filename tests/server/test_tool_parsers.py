"""Tool-call parsers (hermes, llama3_json, mistral, glm45, deepseek_v3 / v31, and the "required" JSON array): calls
and content from whole outputs, the same from streams fed a character (or a few) at a time, and malformed output kept
as content."""

from __future__ import annotations

import json
import random

import pytest

from loom.entrypoints.openai.tool_parsers import DEEPSEEK_MARKERS, REQUIRED_PARSER, TOOL_PARSERS

HERMES, LLAMA, MISTRAL = TOOL_PARSERS["hermes"], TOOL_PARSERS["llama3_json"], TOOL_PARSERS["mistral"]
GLM = TOOL_PARSERS["glm45"].for_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])
"""GLM-4.5's calls, read with the request's tools: city is a string (written raw), days JSON."""
DEEPSEEK_V3, DEEPSEEK_V31 = TOOL_PARSERS["deepseek_v3"], TOOL_PARSERS["deepseek_v31"]
CALLS, CALL, SEP, END, CALLS_END = DEEPSEEK_MARKERS
WEATHER = '{"city": "Paris", "unit": "celsius"}'
TRICKY = '{"q": "a } ] { \\" <tool_call>", "n": [1, {"x": null}], "ok": true}'  # braces and quotes inside strings

# (parser, model output, content, [(name, arguments)])
CASES = {
    "hermes_one": (HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
                   None, [("get_weather", WEATHER)]),
    "hermes_content_before": (HERMES, f'Let me check.\n<tool_call>{{"name": "f", "arguments": {TRICKY}}}</tool_call>',
                              "Let me check.\n", [("f", TRICKY)]),
    "hermes_two_calls": (HERMES, f'<tool_call>\n{{"name": "a", "arguments": {{}}}}\n</tool_call>\n<tool_call>\n'
                                 f'{{"arguments": {WEATHER}, "name": "b"}}\n</tool_call>', None,
                         [("a", "{}"), ("b", WEATHER)]),
    "hermes_unclosed_and_no_arguments": (HERMES, 'ok <tool_call>{"name": "now"}', "ok ", [("now", "{}")]),
    "hermes_quoted_arguments": (HERMES, '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None,
                                [("f", '{"x": 1}')]),
    "hermes_text_after_dropped": (HERMES, '<tool_call>{"name": "f", "arguments": {}}</tool_call> Done {', None,
                                  [("f", "{}")]),
    "hermes_tag_in_prose": (HERMES, 'Use <tool_call> tags, then <tool_call>{"name": "f", "arguments": {"a": 1}}',
                            "Use <tool_call> tags, then ", [("f", '{"a": 1}')]),
    "llama3_python_tag": (LLAMA, '<|python_tag|>{"name": "search", "parameters": {"query": "loom"}}', None,
                          [("search", '{"query": "loom"}')]),
    "llama3_semicolons": (LLAMA, f'{{"name": "a", "parameters": {WEATHER}}}; {{"name": "b", "parameters": {{}}}}',
                          None, [("a", WEATHER), ("b", "{}")]),
    "llama3_content_before": (LLAMA, f'Sure: {{"name": "a", "parameters": {TRICKY}}}', "Sure: ", [("a", TRICKY)]),
    "mistral_array": (MISTRAL, f'[TOOL_CALLS] [{{"name": "a", "arguments": {WEATHER}}}, {{"name": "b", '
                               f'"arguments": {TRICKY}}}]', None, [("a", WEATHER), ("b", TRICKY)]),
    "mistral_content_before": (MISTRAL, 'Checking.[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2]}}]',
                               "Checking.", [("a", '{"x": [1, 2]}')]),
    "glm45_one": (GLM, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                       "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", None,
                  [("get_weather", '{"city": "Paris", "days": 3}')]),
    "glm45_content_before_two_calls": (
        GLM, 'Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>12 "rue" {x}</arg_value>\n'
             '</tool_call>\n<tool_call>now\n<arg_key>opts</arg_key>\n<arg_value>{"tz": [1, 2]}</arg_value>\n'
             '</tool_call>',
        "Checking.\n", [("get_weather", '{"city": "12 \\"rue\\" {x}"}'), ("now", '{"opts": {"tz": [1, 2]}}')]),
    "glm45_string_that_looks_like_json": (
        GLM, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n</tool_call>", None,
        [("get_weather", '{"city": "123"}')]),
    "deepseek_v3_one": (DEEPSEEK_V3, f"{CALLS}{CALL}function{SEP}get_weather\n```json\n{WEATHER}\n```{END}{CALLS_END}",
                        None, [("get_weather", WEATHER)]),
    "deepseek_v3_content_before_two_calls": (
        DEEPSEEK_V3, f"Let me check.\n{CALLS}{CALL}function{SEP}a\n```json\n{TRICKY}\n```{END}\n"
                     f"{CALL}function{SEP}b\n```json\n{{}}\n```{END}{CALLS_END}",
        "Let me check.\n", [("a", TRICKY), ("b", "{}")]),
    "deepseek_v31_two_calls": (
        DEEPSEEK_V31, f"{CALLS}{CALL}get_weather{SEP}{WEATHER}{END}{CALL}f{SEP}{TRICKY}{END}{CALLS_END}", None,
        [("get_weather", WEATHER), ("f", TRICKY)]),
    "deepseek_v3_unfenced_then_fenced": (  # the first call's name ends with its line, not at the next call's fence
        DEEPSEEK_V3, f'{CALLS}{CALL}function{SEP}f\n{{"a": 1}}{END}{CALL}function{SEP}g\n```json\n{{"b": 2}}\n```{END}'
                     f"{CALLS_END}", None, [("f", '{"a": 1}'), ("g", '{"b": 2}')]),
    "deepseek_v31_content_with_a_lone_bracket": (  # and, in the arguments, the start of one of the format's tokens
        DEEPSEEK_V31, f'a <b> {CALLS}{CALL}f{SEP}{{"x": "{CALL[:2]}"}}{END}', "a <b> ",
        [("f", f'{{"x": "{CALL[:2]}"}}')]),
    "required_array": (REQUIRED_PARSER, f'[{{"name":"a","parameters":{WEATHER}}},{{"name":"b","parameters":{{}}}}]',
                       None, [("a", WEATHER), ("b", "{}")]),
}

# (parser, model output): no well-formed call, so the whole text is content
PLAIN = {
    "hermes_no_call": (HERMES, "The weather in Paris is sunny."),
    "hermes_not_json": (HERMES, "Sure <tool_call>{not json}</tool_call>"),
    "hermes_no_name": (HERMES, '<tool_call>{"arguments": {"a": 1}}</tool_call>'),
    "hermes_tag_in_prose_only": (HERMES, "I would use <tool_call> tags for that."),
    "llama3_plain_json": (LLAMA, 'Here: {"city": "Paris"}'),
    "mistral_no_array": (MISTRAL, "[TOOL_CALLS] sorry"),
    "mistral_unicode_prose": (MISTRAL, "déjà vu 🙂 [TOOL"),
    "glm45_no_call": (GLM, "Sunny in Paris, <tool_ca"),
    "glm45_name_never_ends": (GLM, "Sure <tool_call>get_weath"),
    "deepseek_v3_cut_marker": (DEEPSEEK_V3, f"Sunny in Paris {CALL[:7]}"),
    "deepseek_v31_name_never_ends": (DEEPSEEK_V31, f"Sure {CALLS}{CALL}get_wea"),
    "deepseek_v31_name_over_two_lines": (DEEPSEEK_V31, f"Sure {CALLS}{CALL}get\nweather{SEP}{{}}{END}"),
    "deepseek_v3_token_in_the_name": (DEEPSEEK_V3, f"{CALLS}{CALL}function{SEP}f{END}\n```json\n{{}}\n```{END}"),
}
# Named calls that turn out malformed: content when whole; a stream has sent the name by then and cannot take it back
# (as in vLLM), so there the call stays, with the arguments as written.
BROKEN = {
    "hermes_bad_arguments": (HERMES, '<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>'),
    "hermes_truncated": (HERMES, '<tool_call>{"name": "f", "arguments": {"a": '),
    "hermes_one_of_two_bad": (HERMES, '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": 3}</tool_call>'),
    "llama3_arguments_not_object": (LLAMA, '{"name": "f", "parameters": [1, 2]}'),
}

def reassemble(deltas: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) from OpenAI deltas, checking their shape: a call's first delta has its index,
    id, type and name; later ones carry argument pieces only; calls come in index order."""
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content") or ""
        for d in delta.get("tool_calls") or []:
            fn = d["function"]
            if d["index"] == len(calls):
                assert d["id"].startswith("call_") and d["type"] == "function" and fn["name"], d
                calls.append([fn["name"], fn.get("arguments") or ""])
            else:
                assert d["index"] == len(calls) - 1 and "id" not in d and not fn.get("name"), d
                calls[-1][1] += fn["arguments"]
    return content, [tuple(c) for c in calls]


def stream(parser, text: str, seed: int | None = None, max_calls: int | None = None) -> list[dict]:
    """Deltas of ``text`` fed one character at a time (or, with ``seed``, 1-8 characters at a time)."""
    rng, s, deltas, end = random.Random(seed), parser.stream(max_calls), [], 0
    while end < len(text):
        end = min(len(text), end + (rng.randint(1, 8) if seed is not None else 1))
        deltas.append(s.feed(text[:end], final=end == len(text)))
    return [d for d in deltas if d]


def _calls(calls: list[dict]) -> list[tuple[str, str]]:
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("case", CASES)
def test_extract(case):
    parser, text, content, calls = CASES[case]
    got_content, got_calls = parser.extract(text)
    assert (got_content, _calls(got_calls)) == (content, calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("seed", [None, 1, 2])
@pytest.mark.parametrize("case", CASES)
def test_stream_gives_the_same_calls_and_content(case, seed):
    parser, text, content, calls = CASES[case]
    streamed_content, streamed_calls = reassemble(stream(parser, text, seed))
    assert streamed_calls == calls
    assert streamed_content == (content or "") + ("" if calls else text)
    assert streamed_content.strip() == (content or "").strip()


@pytest.mark.parametrize("case", CASES)
def test_calls_that_arrive_whole_in_the_last_feed_are_calls(case):
    """A reader that fell behind gets its deltas merged, and accepted drafts bring many tokens a step: the start of a
    call and all of it can arrive in the final feed, and must still be sent as a call, as the whole answer has it."""
    parser, text, content, calls = CASES[case]
    for cut in (0, len(text) // 3):
        s = parser.stream()
        first = s.feed(text[:cut]) if cut else {}
        assert reassemble([d for d in (first, s.feed(text, final=True)) if d]) == (
            (content or "") + ("" if calls else text), calls)


@pytest.mark.parametrize("case", PLAIN)
def test_output_without_a_call_is_content(case):
    parser, text = PLAIN[case]
    assert parser.extract(text) == (text, [])
    assert reassemble(stream(parser, text, seed=3)) == (text, [])


@pytest.mark.parametrize("case", BROKEN)
def test_malformed_calls_are_content_when_whole(case):
    parser, text = BROKEN[case]
    assert parser.extract(text) == (text, [])
    content, calls = reassemble(stream(parser, text, seed=3))
    assert content == "" and calls[0][0] == "f"


def test_a_cut_constrained_output_keeps_its_calls_as_a_stream_sent_them():
    text = '[{"name":"a","parameters":{"x":1}},{"name":"b","parameters":{"y":[2'  # "required", cut by max_tokens
    assert REQUIRED_PARSER.extract(text) == (text, [])  # strict: not a well-formed call list
    content, calls = REQUIRED_PARSER.extract(text, strict=False)
    assert content is None and _calls(calls) == [("a", '{"x":1}'), ("b", '{"y":[2')]
    assert reassemble(stream(REQUIRED_PARSER, text)) == ("", _calls(calls))


def test_stream_holds_back_a_partial_start_and_streams_arguments_in_pieces():
    s = HERMES.stream()
    assert s.feed("Hi <tool_") == {"content": "Hi "}
    assert s.feed('Hi <tool_call>{"name": "f') == {}
    delta = s.feed('Hi <tool_call>{"name": "f", "arguments": {"a"')
    assert delta["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a"'}
    assert s.feed('Hi <tool_call>{"name": "f", "arguments": {"a": 1}}') == {
        "tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}
    assert s.called and s.feed('Hi <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', final=True) == {}


def test_a_partial_start_at_the_end_is_content():
    s = HERMES.stream()
    assert s.feed("a <tool_c") == {"content": "a "}
    assert s.feed("a <tool_c", final=True) == {"content": "<tool_c"} and not s.called


def test_max_calls_keeps_the_first_call_only():
    parser, text, _, calls = CASES["hermes_two_calls"]
    assert _calls(parser.extract(text, max_calls=1)[1]) == calls[:1]
    assert reassemble(stream(parser, text, max_calls=1))[1] == calls[:1]


@pytest.mark.parametrize("case", [c for c in [*CASES, *PLAIN] if c.startswith(("glm45", "deepseek"))])
def test_a_rewritten_format_rewrites_a_text_to_a_start_of_any_longer_texts_rewrite(case):
    """What a stream has sent is never taken back: the rewrite (into hermes' calls) of every cut of an output, while it
    may grow, starts the rewrite of every longer cut and of the whole output."""
    parser, text = (CASES.get(case) or PLAIN[case])[:2]
    rewrites = [parser.rewrite(text[:end], final=False) for end in range(len(text) + 1)]
    for shorter, longer in zip(rewrites, rewrites[1:]):
        assert longer.startswith(shorter), (shorter, longer)
    if case in CASES:  # a whole output with its calls
        assert parser.rewrite(text, final=True).startswith(rewrites[-1])
