"""POST /v1/responses: OpenAI's Responses API (what the OpenAI Agents SDK and ``client.responses.create`` speak), as
vLLM serves it; and the stored responses' routes.

A request is read as a chat request (``responses_protocol.to_chat``) and runs through the chat route's preparation
(``chat.prepare_chat``): template, tools, grammar, reasoning split. Its answer becomes output items: a ``reasoning``
item (with ``--reasoning-parser``), a ``message`` with one ``output_text`` part, and a ``function_call`` item per
call. A finished output is ``completed``; one cut by ``max_output_tokens`` is ``incomplete``.

``stream: true`` sends OpenAI's typed events (``event: <type>`` + JSON with a ``sequence_number``):
``response.created``, ``response.in_progress``; per item ``response.output_item.added``, its content part's
``response.content_part.added``, the ``response.output_text.delta`` / ``response.reasoning_text.delta`` /
``response.function_call_arguments.delta`` pieces and their ``.done``, ``response.output_item.done``; then
``response.completed`` (or ``response.incomplete``, or ``response.failed`` with the error) with the whole response.
There is no ``[DONE]``.

With ``store`` (the default) the response is kept (``response_store.py``) for ``previous_response_id`` (its
conversation comes before the new input), ``GET /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items`` and
``DELETE /v1/responses/{id}``; ``--max-stored-responses 0`` keeps none and then ignores ``store``, as vLLM does
without its store. ``include: ["message.output_text.logprobs"]`` (+ ``top_logprobs``) puts every output token's
log-probability on the message's text part.
"""

from __future__ import annotations

import time
import uuid

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.outputs import CompletionOutput
from loom.entrypoints.openai.chat import Answer, ChatRun, prepare_chat
from loom.entrypoints.openai.errors import OpenAIError, from_value_error
from loom.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall
from loom.entrypoints.openai.response_store import ResponseStore, StoredResponse
from loom.entrypoints.openai.responses_protocol import ResponsesRequest, to_chat
from loom.entrypoints.openai.serving import (
    SSE_HEADERS,
    ServingContext,
    close_all,
    finals_of,
    now_s,
    unless_disconnected,
)

STATUS = {"stop": "completed", "length": "incomplete", "abort": "failed"}
"""A finish reason's response status (an aborted request: the server stopped it, draining)."""

RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format", "structured_outputs": "text.format"}
"""Chat's field names that a Responses error names instead (chat's preparation raises the error)."""


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


async def create_response(ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, raw: Request):
    if req.model is None:  # optional in the Responses API (vLLM's default too)
        req.model = ctx.model_name
    history = _history(store, req.previous_response_id)
    chat, run = await _prepare(ctx, req, history)
    # the conversation the next turn builds on: without instructions, which OpenAI does not carry over
    conversation = chat.messages[1:] if req.instructions else chat.messages
    reply = Reply(ctx, req, run, item_id("resp"), conversation)
    streams = await ctx.open_streams(reply.id, [run.prompt], run.params, time.time(), run.lora, run.priority)
    keep = store if req.store and store.enabled else None
    if req.stream:
        return StreamingResponse(_stream(reply, streams[0], keep), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        return await unless_disconnected(_full(reply, streams, keep), raw)
    finally:
        close_all(streams)


def _history(store: ResponseStore, previous_id: str | None) -> list[ChatMessage]:
    if previous_id is None:
        return []
    stored = store.get(previous_id)
    if stored is None:
        raise OpenAIError(404, f"no stored response has id {previous_id!r}: it was never stored (store: false), was "
                          f"deleted, or is older than the {store.max_responses} this server keeps "
                          "(--max-stored-responses); send the whole conversation in input instead",
                          param="previous_response_id", code="response_not_found")
    return stored.conversation


async def _prepare(ctx: ServingContext, req: ResponsesRequest,
                   history: list[ChatMessage]) -> tuple[ChatCompletionRequest, ChatRun]:
    """The chat request and its preparation, errors naming the Responses fields."""
    try:
        chat = to_chat(req, history)
        return chat, await prepare_chat(ctx, chat)
    except OpenAIError as exc:
        raise _renamed(exc) from None
    except ValueError as exc:  # SamplingParams' range checks
        raise _renamed(from_value_error(exc)) from None


def _renamed(exc: OpenAIError) -> OpenAIError:
    if exc.param is None:
        return exc
    head, _, rest = exc.param.partition(".")
    if head not in RENAMED:
        return exc
    message = exc.message.replace(head, RENAMED[head]) if head != "messages" else exc.message
    return OpenAIError(exc.status, message, f"{RENAMED[head]}.{rest}".rstrip("."), exc.code, exc.headers)


class Reply:
    """One response being made: its id, the request's echoed settings, and its answer as output items."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, run: ChatRun, response_id: str,
                 conversation: list[ChatMessage]):
        self.ctx, self.req, self.run = ctx, req, run
        self.id, self.created_at = response_id, now_s()
        self.conversation = conversation
        """The prompt's messages without the instructions: with the answer, the next turn's history."""

    @property
    def answer(self) -> Answer:
        return self.run.answer

    def body(self, finish_reason: str | None, output: list[dict], usage: dict | None = None,
             error: dict | None = None) -> dict:
        """The response object; ``finish_reason`` sets its status (None: in progress, or failed with ``error``)."""
        req = self.req
        status = "failed" if error else STATUS.get(finish_reason, "in_progress")
        if finish_reason == "abort":
            error = {"code": "cancelled", "message": "the server stopped this response before it finished"}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"), "tools": req.tools or [],
            "top_logprobs": req.top_logprobs, "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation, "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

    def logprobs(self, c: CompletionOutput) -> list[dict]:
        if not self.req.wants_logprobs or c.logprobs is None:
            return []
        return self.ctx.strings.chat_entries(c.token_ids, c.logprobs, self.req.top_logprobs or 0)

    def items(self, text: str, logprobs: list[dict], cut: bool) -> list[dict]:
        """A finished answer's output items: reasoning, then the message, then the calls; the last ``incomplete``
        where the output was ``cut`` by max_output_tokens. A message of whitespace only (between a thinking block and
        a call) is left out beside other items; alone, it is kept, and an answer with nothing at all is an empty
        message."""
        message, _ = self.answer.message(text)
        content = message["content"] or ""
        items = []
        if message.get("reasoning_content"):
            items.append(reasoning_item(item_id("rs"), message["reasoning_content"]))
        if content.strip() or not (items or message.get("tool_calls")):
            items.append(message_item(item_id("msg"), content, logprobs))
        items += [call_item(item_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"])
                  for c in message.get("tool_calls", ())]
        if cut:
            items[-1]["status"] = "incomplete"
        return items

    async def usage(self, token_ids: list[int], output: list[dict], cached: int) -> dict:
        reasoning = await self._reasoning_tokens(token_ids, output)
        prompt_len, completion = len(self.run.prompt), len(token_ids)
        return {"input_tokens": prompt_len, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": prompt_len + completion}

    async def _reasoning_tokens(self, token_ids: list[int], output: list[dict]) -> int:
        text = "".join(part["text"] for item in output if item["type"] == "reasoning" for part in item["content"])
        if not text:
            return 0
        think = self.ctx.think
        if think is not None:  # the block ends at its end tag's token
            return token_ids.index(think.end) + 1 if think.end in token_ids else len(token_ids)
        return len(await self.ctx.encoder.encode(text, add_special_tokens=False))  # tags of several tokens: close

    def stored(self, body: dict) -> StoredResponse:
        answer = assistant_message(body["output"])
        inputs = [{"id": item_id("msg"), **item} for item in _input_items(self.req.input)]
        return StoredResponse(body, [*self.conversation, *([answer] if answer else [])], inputs)


def _input_items(value: str | list[dict]) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [{"type": "message", **item} if "type" not in item else item for item in value]


def reasoning_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"id": rid, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def message_item(mid: str, text: str, logprobs: list[dict], status: str = "completed") -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": [part]}


def call_item(fid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": fid, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def assistant_message(output: list[dict]) -> ChatMessage | None:
    """The answer as the next turn's history: its text and calls (its reasoning dropped)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"], arguments=item["arguments"]))
             for item in output if item["type"] == "function_call"]
    if not text and not calls:
        return None
    return ChatMessage(role="assistant", content=text, tool_calls=calls or None)


async def _full(reply: Reply, streams, store: ResponseStore | None) -> JSONResponse:
    out = (await finals_of(streams))[0]
    c = out.outputs[0]
    output = reply.items(c.text, reply.logprobs(c), cut=c.finish_reason == "length")
    body = reply.body(c.finish_reason, output, await reply.usage(c.token_ids, output, out.num_cached_tokens))
    if store is not None and body["status"] != "failed":
        store.put(reply.stored(body))
    return JSONResponse(body)


async def _stream(reply: Reply, stream, store: ResponseStore | None):
    assert stream.delta, "a stream's outputs are deltas (ChatCompletionRequest.sampling_params)"
    events = ResponseEvents()
    choice = reply.answer.stream()
    text, token_ids, cached, reason = "", [], 0, None
    try:
        yield events.emit("response.created", response=reply.body(None, []))
        yield events.emit("response.in_progress", response=reply.body(None, []))
        async for out in stream:
            cached = out.num_cached_tokens
            for c in out.outputs:
                text += c.text
                token_ids += c.token_ids
                for event in events.feed(choice.feed(text, final=c.finished), reply.logprobs(c)):
                    yield event
                reason = c.finish_reason if c.finished else reason
        for event in events.close(cut=reason == "length"):
            yield event
        output = events.output
        # a stream that ends unfinished was aborted (the server draining)
        body = reply.body(reason or "abort", output, await reply.usage(token_ids, output, cached))
        if store is not None and body["status"] != "failed":
            store.put(reply.stored(body))
        yield events.emit(f"response.{body['status']}", response=body)
    except Exception as exc:  # mid-stream failure: the response fails with the error
        error = exc.body()["error"] if isinstance(exc, OpenAIError) else {"message": str(exc)}
        yield events.emit("response.failed", response=reply.body(
            None, events.output, error={"code": error.get("code") or "server_error", "message": error["message"]}))
    finally:
        close_all([stream])


class ResponseEvents:
    """A streamed answer's chat deltas (``ChoiceStream.feed``) -> Responses events; ``output`` holds the items
    finished so far. One item is open at a time: reasoning, a message, or a function call."""

    def __init__(self):
        self.output: list[dict] = []
        self._sequence = 0
        self._open: dict | None = None
        self._logprobs: list[dict] = []  # of tokens not yet sent with a text delta
        self._blank = ""  # whitespace content not yet sent: a message only if something else follows it

    def emit(self, kind: str, **fields) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def feed(self, delta: dict, logprobs: list[dict]) -> list[bytes]:
        self._logprobs += logprobs
        events = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._content(delta["content"])
        for call in delta.get("tool_calls", ()):
            events += self._call(call)
        return events

    def close(self, cut: bool) -> list[bytes]:
        """The last item's end (``incomplete`` where the output was ``cut``); the held whitespace (or an empty
        message) when the answer made no item at all, as ``Reply.items`` makes a whole answer's."""
        events = self._text("message", self._blank) if not self.output and self._open is None else []
        return events + self._close("incomplete" if cut else "completed")

    def _content(self, piece: str) -> list[bytes]:
        if not (self._open is not None and self._open["type"] == "message") and not piece.strip():
            self._blank += piece
            return []
        piece, self._blank = self._blank + piece, ""
        return self._text("message", piece)

    @property
    def _index(self) -> int:
        return len(self.output)

    def _text(self, kind: str, piece: str) -> list[bytes]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._close() + self._open_text(kind)
        item = self._open
        part = item["content"][0]
        part["text"] += piece
        where = {"item_id": item["id"], "output_index": self._index, "content_index": 0}
        if kind == "reasoning":
            return [*events, self.emit("response.reasoning_text.delta", **where, delta=piece)]
        logprobs, self._logprobs = self._logprobs, []
        part["logprobs"] += logprobs
        return [*events, self.emit("response.output_text.delta", **where, delta=piece, logprobs=logprobs)]

    def _open_text(self, kind: str) -> list[bytes]:
        if kind == "reasoning":
            self._open = reasoning_item(item_id("rs"), "", status="in_progress")
        else:
            self._open = message_item(item_id("msg"), "", [], status="in_progress")
        item = {**self._open, "content": []}
        part = {**self._open["content"][0]}
        return [self.emit("response.output_item.added", output_index=self._index, item=item),
                self.emit("response.content_part.added", item_id=self._open["id"], output_index=self._index,
                          content_index=0, part=part)]

    def _call(self, call: dict) -> list[bytes]:
        events = []
        function = call.get("function", {})
        if "id" in call:  # a new call: its first delta has the id and name
            events += self._close()
            self._open = call_item(item_id("fc"), call["id"], function["name"], "", status="in_progress")
            events.append(self.emit("response.output_item.added", output_index=self._index, item={**self._open}))
        piece = function.get("arguments") or ""
        if piece:
            self._open["arguments"] += piece
            events.append(self.emit("response.function_call_arguments.delta", item_id=self._open["id"],
                                    output_index=self._index, delta=piece))
        return events

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        where = {"item_id": item["id"], "output_index": self._index}
        if item["type"] == "function_call":
            events = [self.emit("response.function_call_arguments.done", **where, name=item["name"],
                                arguments=item["arguments"])]
        else:
            part = item["content"][0]
            if item["type"] == "message":
                part["logprobs"] += self._logprobs
                self._logprobs = []
                done = self.emit("response.output_text.done", **where, content_index=0, text=part["text"],
                                 logprobs=part["logprobs"])
            else:
                done = self.emit("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            events = [done, self.emit("response.content_part.done", **where, content_index=0, part=part)]
        events.append(self.emit("response.output_item.done", output_index=self._index, item=item))
        self.output.append(item)
        return events


def stored_response(store: ResponseStore, response_id: str) -> StoredResponse:
    stored = store.get(response_id)
    if stored is None:
        raise OpenAIError(404, f"no stored response has id {response_id!r} (store: false, deleted, or older than the "
                          f"{store.max_responses} this server keeps)", param="response_id", code="response_not_found")
    return stored


def input_items_page(stored: StoredResponse, limit: int, order: str, after: str | None) -> dict:
    """A page of a stored response's input items (OpenAI's list shape; ``order`` "desc", its default, is newest
    first)."""
    if not 1 <= limit <= 100:
        raise OpenAIError(400, f"limit must be in [1, 100], got {limit}", param="limit", code="invalid_value")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, f'order must be "asc" or "desc", got {order!r}', param="order", code="invalid_value")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise OpenAIError(400, f"after names no input item of this response: {after!r}", param="after",
                              code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
