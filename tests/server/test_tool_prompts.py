"""Tools in the prompt: a chat template that renders tools gets them (and calls' arguments as dicts) as they are; one
that ignores them (SmolLM2's) gets the Hermes format in the messages; the parser's special tokens are detected."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from loom.entrypoints.openai.protocol import ChatMessage
from loom.entrypoints.openai.serving import ServingContext
from tests.server.test_tools_api import HISTORY, TOOLS

NATIVE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }};{% endfor %}"
    "{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}{{ '\\n' }}{% endfor %}"
)
"""A template that renders tools, assistant calls (arguments through tojson, as Qwen's and Llama's do) and ids."""


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(str(smollm2_path))


def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[ServingContext, str]:
    ctx = ServingContext(SimpleNamespace(tokenizer=tokenizer, max_model_len=4096, image_tokens=None), ["m"])
    try:
        ids = asyncio.run(ctx.apply_chat_template([ChatMessage(**m) for m in messages], tools=tools))
        return ctx, tokenizer.decode(ids)
    finally:
        ctx.close()


def test_a_template_that_renders_tools_gets_them_natively(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", NATIVE)
    ctx, text = render(tokenizer, HISTORY, TOOLS)
    assert ctx.template_has_tools and text.startswith("TOOLS:get_weather;get_time;\nuser: What is the weather")
    assert 'CALL get_weather {"city": "Paris", "unit": "celsius"};CALL get_time {"timezone": "Tokyo"};' in text
    assert 'tool: {"time": "18:04"} [call_2]' in text and "<tool" not in text


def test_a_template_that_ignores_tools_gets_the_hermes_format(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *HISTORY]
    ctx, text = render(tokenizer, messages, TOOLS)
    assert not ctx.template_has_tools
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert text.count('<tool_call>\n{"name": "get_') == 2 and text.count("<|im_start|>user\n<tool_response>") == 1
    _, plain = render(tokenizer, messages[:2], None)  # no tools, no tool turns: the template's own rendering
    assert plain == tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)


def test_special_tokens_of_a_format_are_detected(tokenizer):
    ctx = ServingContext(SimpleNamespace(tokenizer=tokenizer), ["m"])
    assert ctx.has_special_token(("<|im_end|>",)) and not ctx.has_special_token(("<tool_call>", "[TOOL_CALLS]"))
