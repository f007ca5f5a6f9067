"""Tool calling for /v1/chat/completions: what a request's ``tools`` and ``tool_choice`` mean for its prompt, its
sampling and its answer.

    plan = plan_tools(req, ToolSettings(parser="hermes", enable_auto=True))   # 400s for bad tools / tool_choice
    params = req.sampling_params(plan.structured)       # named / "required": the output held to a JSON schema
    content, calls = plan.message(text)                 # non-streaming answer
    stream = plan.stream(); delta = stream.feed(text_so_far, final)   # streaming

``tool_choice`` as vLLM reads it: a named function constrains the output to that function's ``parameters`` schema
(the output is the arguments); ``"required"`` to a JSON array of ``{"name", "parameters"}`` (anyOf over the tools,
at most one item when ``parallel_tool_calls`` is false); so both always parse, whatever the model, and need no
parser. ``"auto"`` (the default when tools are given) needs ``--enable-auto-tool-choice`` and
``--tool-call-parser``, else 400, as in vLLM; the parser finds calls in free text. ``"none"`` returns text; the
tools are still rendered into the prompt unless ``--exclude-tools-when-tool-choice-none`` (vLLM's default and flag).

The tools reach the model through its own chat template (``tools=``). A template that never mentions ``tools``
(SmolLM2's) would drop them silently, so for such a template the tools go into the system prompt in the Hermes /
Qwen 2.5 format, earlier calls into the assistant text as ``<tool_call>`` blocks and tool results into a user turn
as ``<tool_response>`` blocks: the format the ``hermes`` parser reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from loom.engine.structured import StructuredOutputsParams
from loom.entrypoints.openai.errors import bad_request
from loom.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from loom.entrypoints.openai.tool_parsers import (
    REQUIRED_PARSER,
    TOOL_PARSERS,
    ToolCallStream,
    ToolParser,
    tool_call,
)

EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
"""The arguments of a function without ``parameters``: always ``{}``."""

NAMED_USAGE = 'give tool_choice as "none", "auto", "required" or {"type": "function", "function": {"name": "f"}}'


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """The server's tool-calling switches (``LLMServerConfig``'s tool fields)."""

    parser: str | None = None
    enable_auto: bool = False
    exclude_when_none: bool = False


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What one request does with its tools."""

    mode: Literal["none", "auto", "required", "named"] = "none"
    tools: list[dict] | None = None
    """The tools as the chat template gets them; None: the prompt has none."""
    structured: StructuredOutputsParams | None = None
    function: str | None = None
    """The function tool_choice names."""
    parser: ToolParser | None = None
    max_calls: int | None = None

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished output."""
        if self.mode == "named":
            return None, [tool_call(self.function, text)]
        if self.parser is None:
            return text, []
        return self.parser.extract(text, self.max_calls, strict=self.mode == "auto")

    def stream(self) -> TextStream | NamedCallStream | ToolCallStream:
        """A fresh stream for one choice: ``feed(text_so_far, final) -> delta`` and ``called``."""
        if self.mode == "named":
            return NamedCallStream(self.function)
        if self.parser is None:
            return TextStream()
        return self.parser.stream(self.max_calls, strict=self.mode == "auto")


class TextStream:
    """No tool parsing: the new text is the delta."""

    called = False

    def __init__(self):
        self._sent = 0

    def feed(self, text: str, final: bool = False) -> dict:
        piece, self._sent = text[self._sent:], len(text)
        return {"content": piece} if piece else {}


class NamedCallStream:
    """tool_choice names a function: the constrained output is its arguments, streamed as argument pieces."""

    called = True

    def __init__(self, function: str):
        self.function = function
        self._sent: int | None = None

    def feed(self, text: str, final: bool = False) -> dict:
        if self._sent is None:
            self._sent = len(text)
            return {"tool_calls": [{"index": 0, **tool_call(self.function, text)}]}
        piece, self._sent = text[self._sent:], len(text)
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}


def finish_reason_of(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for an output that ended by itself with calls; ``length`` stays ``length``."""
    return "tool_calls" if called and reason == "stop" else reason


def plan_tools(req: ChatCompletionRequest, settings: ToolSettings) -> ToolPlan:
    """The request's tool plan; 400 naming the field for a tool_choice that does not fit the tools or the server."""
    tools = req.tools or []
    _check_unique(tools)
    choice = _tool_choice(req.tool_choice, req.tools)
    rendered = template_tools(tools)
    max_calls = None if req.parallel_tool_calls else 1
    if choice == "none":
        return ToolPlan(tools=None if settings.exclude_when_none else rendered)
    if choice == "auto":
        if not (settings.enable_auto and settings.parser):
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                              '(tool_choice defaults to "auto" when tools are given); or give tool_choice "none", '
                              '"required" or a named function', "tool_choice")
        parser = TOOL_PARSERS[settings.parser]
        if hasattr(parser, "for_tools"):  # a rewritten format reads the tools' argument types
            parser = parser.for_tools(rendered)
        return ToolPlan("auto", rendered, parser=parser, max_calls=max_calls)
    if choice == "required":
        schema = _required_schema(tools, req.parallel_tool_calls)
        return ToolPlan("required", rendered, StructuredOutputsParams(json=schema), parser=REQUIRED_PARSER,
                        max_calls=max_calls)
    tool = next((t for t in tools if t.function.name == choice.function.name), None)
    if tool is None:
        raise bad_request(f"tool_choice names the function '{choice.function.name}' but tools has no function of "
                          f"that name; tools has: {', '.join(t.function.name for t in tools) or 'none'}", "tool_choice")
    return ToolPlan("named", rendered, StructuredOutputsParams(json=_parameters(tool)), function=tool.function.name)


def template_tools(tools: list[Tool] | None) -> list[dict] | None:
    """The tools as chat templates take them (OpenAI's shape, unset fields left out); None for none."""
    return [tool.model_dump(exclude_none=True) for tool in tools or []] or None


def _tool_choice(value, tools: list[Tool] | None) -> str | NamedToolChoice:
    """tool_choice normalised: "none", "auto", "required" or the named function (OpenAI's defaults and rules)."""
    if isinstance(value, dict):
        try:
            value = NamedToolChoice.model_validate(value)
        except ValidationError:
            raise bad_request(f"invalid tool_choice {json.dumps(value)[:200]}; {NAMED_USAGE}", "tool_choice") from None
    elif value is not None and value not in ("none", "auto", "required"):
        raise bad_request(f"invalid tool_choice {value!r}; {NAMED_USAGE}", "tool_choice")
    if value in (None, "none"):
        return "auto" if value is None and tools else "none"
    if tools is None:
        raise bad_request("tool_choice needs tools: give the functions in tools", "tool_choice")
    if not tools and value in ("auto", "required"):
        return "none"  # OpenAI: an empty tool list calls nothing
    return value


def _check_unique(tools: list[Tool]) -> None:
    names = [t.function.name for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise bad_request(f"tools has more than one function named {', '.join(twice)}; names must be unique", "tools")


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or EMPTY_PARAMETERS


def _required_schema(tools: list[Tool], parallel: bool) -> dict:
    """A JSON array of calls, each ``{"name": <one tool>, "parameters": <its schema>}`` (vLLM's shape)."""
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                              "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    defs = _shared_defs(tools)
    if defs:
        schema["$defs"] = defs
    return schema


def _shared_defs(tools: list[Tool]) -> dict:
    """Every tool's ``$defs``, lifted to the array's root: inside it, ``#/$defs/X`` refers to the root."""
    defs: dict = {}
    for tool in tools:
        own = _parameters(tool).get("$defs")
        for key, value in (own.items() if isinstance(own, dict) else ()):  # not a dict: the compiler says so
            if defs.setdefault(key, value) != value:
                raise bad_request(f"two tools define $defs.{key} differently; rename one of them", "tools")
    return defs


def template_messages(messages: list[ChatMessage], tools: list[dict] | None, template_has_tools: bool) -> list[dict]:
    """The messages as the chat template gets them; for a template that ignores tools, in the Hermes format."""
    dicts = [m.as_template_dict() for m in messages]
    if template_has_tools:
        return dicts
    dicts = _tool_turns_as_text(dicts)
    return _with_tools_prompt(dicts, tools) if tools else dicts


TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
"""Qwen 2.5's wording (its template's tools section), which Hermes-format models are trained on."""


def _with_tools_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{prompt}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _tool_turns_as_text(messages: list[dict]) -> list[dict]:
    """Assistant calls as ``<tool_call>`` text; consecutive tool results as one user turn of ``<tool_response>``."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("is_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "is_tool_results": True})
        elif m.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": m["role"], "content": f"{m['content']}\n{calls}".lstrip()})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "is_tool_results"} for m in out]
