"""The request of OpenAI's Responses API (``POST /v1/responses``) and its reading as a chat request.

A Responses request is a chat request in other words: ``input`` (a string, or a list of items: messages, earlier
``function_call`` items and their ``function_call_output``) plus ``instructions`` is the message list; ``tools`` are
function tools written flat (``{"type": "function", "name", "parameters"}``); ``text.format`` is chat's
``response_format``; ``max_output_tokens`` is ``max_completion_tokens``. ``to_chat`` maps it onto
``ChatCompletionRequest``, so the template, tools, grammars and reasoning split are the chat route's own.

    chat = to_chat(req, history)      # history: the messages of previous_response_id's conversation
    # 400 (OpenAIError naming the Responses field) for items, tools or options this server cannot take

What a text-only server cannot do is refused by name rather than ignored: image, file and audio parts, hosted tools
(web search, file search, code interpreter, MCP), ``background`` with ``stream`` and ``truncation: "auto"``. Earlier
``reasoning`` items are dropped from the prompt, as chat templates drop earlier turns' thinking. Loom's sampling extras
(``SAMPLING_EXTRAS``: ``top_k``, ``seed``, ``stop``, ...) and ``chat_template_kwargs`` pass through as in chat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.entrypoints.openai.errors import OpenAIError, bad_request, from_validation
from loom.entrypoints.openai.protocol import MAX_TOOLS, ChatCompletionRequest, ChatMessage

MAX_INPUT_ITEMS = 4096
"""Items in ``input``: each becomes (part of) a message; the prompt's character and token limits bound the rest."""

SAMPLING_EXTRAS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
                   "min_tokens", "ignore_eos", "stop_token_ids", "allowed_token_ids", "logit_bias",
                   "skip_special_tokens", "include_stop_str_in_output", "chat_template_kwargs", "priority")
"""Chat fields a Responses request may carry too (vLLM's extras; OpenAI's API has none of them)."""

INCLUDABLE = frozenset({"message.output_text.logprobs", "reasoning.encrypted_content",
                        "message.input_image.image_url", "file_search_call.results", "web_search_call.results",
                        "web_search_call.action.sources", "code_interpreter_call.outputs",
                        "computer_call_output.output.image_url"})
"""OpenAI's ``include`` values. Only ``message.output_text.logprobs`` changes an answer here: the others name
content this server never makes (encrypted reasoning, hosted tools' results, images)."""

LOGPROBS = "message.output_text.logprobs"
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
"""Content part types that carry text, and the key that holds it."""
MEDIA_PARTS = ("input_image", "input_file", "input_audio")


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: str | None = None
    summary: str | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: dict[str, Any] | None = None
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "name", "schema", "strict"}``."""


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # SAMPLING_EXTRAS are read from the extras; other keys are ignored

    model: str | None = None
    """None: the served model."""
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    truncation: Literal["disabled", "auto"] = "disabled"
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    """OpenAI's bounds: 16 pairs, keys of 64 and values of 512 characters."""
    user: str | None = None

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    def extras(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items() if k in SAMPLING_EXTRAS}


def to_chat(req: ResponsesRequest, history: list[ChatMessage]) -> ChatCompletionRequest:
    """The chat request ``req`` means, after ``history`` (the conversation of ``previous_response_id``)."""
    _check_supported(req)
    messages = input_messages(req.input, history)
    if req.instructions:
        messages.insert(0, ChatMessage(role="system", content=req.instructions))
    if not messages:
        raise bad_request("input is empty; give a string or at least one message item", "input")
    effort = req.reasoning.effort if req.reasoning else None
    if effort not in (None, "low", "medium", "high"):
        raise bad_request(f"reasoning.effort must be low, medium or high, got {effort!r}", "reasoning.effort")
    fields = {
        "model": req.model, "messages": messages, "max_completion_tokens": req.max_output_tokens,
        # stream: the engine's outputs as deltas, streamed or not: one reading makes both (responses.py)
        "temperature": req.temperature, "top_p": req.top_p, "stream": True,
        "logprobs": req.wants_logprobs, "top_logprobs": req.top_logprobs if req.wants_logprobs else None,
        "tools": chat_tools(req.tools), "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls, "response_format": response_format(req.text),
        "reasoning_effort": effort,
        **req.extras(),
    }
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc.errors()) from None


def _check_supported(req: ResponsesRequest) -> None:
    if req.background and (req.stream or not req.store):
        raise bad_request("a background response is stored and read with GET /v1/responses/{id}: it needs store "
                          "true and stream false", "background")
    if req.truncation == "auto":
        raise bad_request('truncation "auto" is not supported: a conversation longer than the context is a 400; '
                          'leave truncation "disabled" and start a shorter conversation', "truncation")
    unknown = sorted(set(req.include or ()) - INCLUDABLE)
    if unknown:
        raise bad_request(f"include has unknown values {unknown}; this server fills {LOGPROBS!r}", "include")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise bad_request(f"top_logprobs must be in [0, 20], got {req.top_logprobs}", "top_logprobs")


def input_messages(value: str | list[dict[str, Any]], history: list[ChatMessage]) -> list[ChatMessage]:
    """``history`` and then ``input`` as chat messages: each message item one message, a run of ``function_call``
    items the calls of one assistant message (the message before them, if it is the assistant's), each
    ``function_call_output`` a tool message."""
    messages = list(history)
    if isinstance(value, str):
        return [*messages, ChatMessage(role="user", content=value)]
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, f"input.{i}"))
        elif kind == "function_call":
            _add_call(messages, item, f"input.{i}")
        elif kind == "function_call_output":
            messages.append(_tool_result(item, f"input.{i}"))
        elif kind != "reasoning":  # earlier thinking: dropped, as chat templates drop it from earlier turns
            raise bad_request(f"input item type {kind!r} is not supported; give message, function_call, "
                              "function_call_output or reasoning items", f"input.{i}.type")
    return messages


def _message(item: dict, where: str) -> ChatMessage:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad_request(f"a message item's role must be user, system, developer or assistant, got {role!r}",
                          f"{where}.role")
    content = item.get("content")
    if role == "user" and isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return ChatMessage(role=role, content=_parts(content, f"{where}.content"))
    return ChatMessage(role=role, content=_text(content, f"{where}.content"))


def _parts(content: list, where: str) -> list[dict]:
    """A user message's text and ``input_image`` parts as chat content parts (images as ``image_url``; a vision model
    reads them, a text model answers 400)."""
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise bad_request("an input_image part needs image_url (a data: URL); file_id is not supported",
                                  f"{where}.{j}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            parts.append({"type": "text", "text": _text([part], f"{where}.{j}")})
    return parts


def _text(content: Any, where: str) -> str:
    """A message item's content as one text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise bad_request(f"{kind} parts are not supported here: images go in user messages (input_image, to a "
                              "vision model); files and audio not at all", f"{where}.{j}.type")
        key = TEXT_PARTS.get(kind)
        if key is None or not isinstance(part.get(key), str):
            raise bad_request(f"content part {j} must be an input_text part with a string 'text', got "
                              f"{str(part)[:80]}", f"{where}.{j}")
        texts.append(part[key])
    return "".join(texts)


def _add_call(messages: list[ChatMessage], item: dict, where: str) -> None:
    """A ``function_call`` item joins the assistant message before it, or opens one."""
    call = {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
    if not isinstance(call["id"], str) or not isinstance(call["function"]["name"], str):
        raise bad_request("a function_call item needs its call_id and name (strings)", where)
    last = messages[-1] if messages else None
    try:
        calls = ChatMessage(role="assistant", content="", tool_calls=[call]).tool_calls
        if last is not None and last.role == "assistant":  # a copy: the message may be a stored conversation's
            messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), *calls]})
        else:
            messages.append(ChatMessage(role="assistant", content="", tool_calls=calls))
    except ValidationError as exc:
        raise OpenAIError(400, f"invalid function_call item: {exc.errors()[0]['msg']}", param=f"{where}.arguments",
                          code="invalid_value") from None


def _tool_result(item: dict, where: str) -> ChatMessage:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise bad_request("a function_call_output item needs the call_id of the call it answers", f"{where}.call_id")
    return ChatMessage(role="tool", tool_call_id=call_id, content=_text(output, f"{where}.output"))


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict] | None:
    """Flat function tools in chat's shape (``{"type": "function", "function": {...}}``); hosted tools are a 400."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise bad_request(f"tool type {tool.get('type')!r} is not supported: this server calls function tools "
                              "only (your code runs them and sends back function_call_output items)",
                              f"tools.{i}.type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict | None:
    """``{"type": "function", "name": "f"}`` as chat's ``{"type": "function", "function": {"name": "f"}}``."""
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "name": "f"}; '
                          f"got {str(choice)[:80]}", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(text: TextConfig | None) -> dict | None:
    """``text.format`` as chat's ``response_format``."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") != "json_schema":
        raise bad_request(f"text.format.type must be text, json_object or json_schema, got {fmt.get('type')!r}",
                          "text.format.type")
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request("a json_schema text.format needs its schema (a JSON schema object)", "text.format.schema")
    schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": schema}
