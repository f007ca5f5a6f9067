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
without its store. ``background`` answers at once and makes the response in a task of its own (read with GET,
stopped with ``POST /v1/responses/{id}/cancel``). ``include: ["message.output_text.logprobs"]`` (+ ``top_logprobs``)
gives the message text's tokens their log-probabilities (``response_events.ResponseEvents``).

A whole answer and a stream are one reading (``_answer``) of the engine's deltas through the chat route's stream
parsers, so both hold the same items: a call cut short by ``max_output_tokens`` is an ``incomplete`` function_call in
both, where chat's whole answer would give its text as content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.entrypoints.openai.chat import Answer, ChatRun, prepare_chat
from loom.entrypoints.openai.errors import OpenAIError, from_value_error
from loom.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall, is_json_object
from loom.entrypoints.openai.response_events import ResponseEvents, item_id
from loom.entrypoints.openai.response_store import ResponseStore, StoredResponse
from loom.entrypoints.openai.responses_protocol import ResponsesRequest, to_chat
from loom.entrypoints.openai.serving import (
    SSE_HEADERS,
    ServingContext,
    close_all,
    now_s,
    unless_disconnected,
)

STATUS = {"stop": "completed", "length": "incomplete", "abort": "failed", "cancelled": "cancelled"}
"""A finish reason's response status (an aborted request: the server stopped it, draining)."""

RENAMED = {"messages": "input", "prompt": "input", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens", "response_format": "text.format", "structured_outputs": "text.format"}
"""Chat's field names that a Responses error names instead (chat's preparation raises the error)."""


async def create_response(ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, raw: Request):
    if req.model is None:  # optional in the Responses API (vLLM's default too)
        req.model = ctx.model_name
    if req.background and not store.enabled:  # before any work
        raise OpenAIError(400, "background responses need the server to keep responses (--max-stored-responses "
                          "above 0)", param="background", code="invalid_value")
    history = _history(store, req.previous_response_id)
    chat, run = await _prepare(ctx, req, history)
    # the conversation the next turn builds on: without instructions, which OpenAI does not carry over
    conversation = chat.messages[1:] if req.instructions else chat.messages
    reply = Reply(ctx, req, replace(run, multi_modal_data=None), item_id("resp"), conversation)
    try:
        streams = await ctx.open_streams(reply.id, [run.prompt], run.params, time.time(), run.lora, run.priority,
                                         multi_modal_data=run.multi_modal_data)
    except OpenAIError as exc:
        raise _renamed(exc) from None
    del run  # the images are the engine's now: nothing here keeps them
    keep = store if req.store and store.enabled else None
    if req.background:
        return _start_in_background(reply, streams[0], store)
    if req.stream:
        return StreamingResponse(_stream(reply, streams[0], keep), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        return await unless_disconnected(_full(reply, streams[0], keep), raw)
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
    if stored.body["status"] not in ("completed", "incomplete"):
        raise OpenAIError(400, f"response {previous_id!r} is {stored.body['status']}: a conversation goes on from a "
                          "finished response", param="previous_response_id", code="invalid_value")
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
    """``exc`` naming the Responses field where chat's preparation named its own."""
    if exc.param is None:
        return exc
    head, _, rest = exc.param.partition(".")
    if head == "tools":  # chat's tools.N.function.name is tools.N.name here
        return OpenAIError(exc.status, exc.message, exc.param.replace(".function.", ".", 1), exc.code, exc.headers)
    if head not in RENAMED:
        return exc
    message = exc.message
    for chat_name in ("max_completion_tokens", "max_tokens", "response_format"):
        message = message.replace(chat_name, RENAMED[chat_name])
    return OpenAIError(exc.status, message, f"{RENAMED[head]}.{rest}".rstrip("."), exc.code, exc.headers)


class Reply:
    """One response being made: its id, the request's echoed settings, and its answer as output items."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, run: ChatRun, response_id: str,
                 conversation: list[ChatMessage]):
        self.ctx, self.req, self.run = ctx, req, run
        self.id, self.created_at = response_id, now_s()
        self.conversation = conversation
        """The prompt's messages without the instructions: with the answer, the next turn's history."""
        self.input_items = [input_item(item) for item in _as_items(req.input)]
        """``input`` as ``input_items`` lists it (ids given once, the same while in progress and after)."""

    @property
    def answer(self) -> Answer:
        return self.run.answer

    def body(self, finish_reason: str | None, output: list[dict], usage: dict | None = None,
             error: dict | None = None) -> dict:
        """The response object; ``finish_reason`` sets its status (None: in progress, or failed with ``error``)."""
        req, defaults = self.req, self.ctx.sampling_defaults  # the values the model's defaults filled in, echoed
        status = "failed" if error else STATUS.get(finish_reason, "in_progress")
        if finish_reason == "abort":  # the server draining, or a grammar matcher's failure (logged)
            error = {"code": "server_error", "message": "the engine stopped this response before it finished"}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": req.background, "error": error, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store, "temperature": defaults.value("temperature", req.temperature, 1.0),
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "top_logprobs": req.top_logprobs, "top_p": defaults.value("top_p", req.top_p, 1.0),
            "truncation": req.truncation, "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

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
            end = think.block_end(token_ids)
            return len(token_ids) if end is None else end
        return len(await self.ctx.encoder.encode(text, add_special_tokens=False))  # tags of several tokens: close

    def stored(self, body: dict) -> StoredResponse:
        answer = assistant_message(body["output"])
        return StoredResponse(body, [*self.conversation, *([answer] if answer else [])], self.input_items)


def _as_items(value: str | list[dict]) -> list[dict]:
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


INPUT_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_item(item: dict) -> dict:
    """An input item as ``input_items`` lists it: typed, with an id and a status, a message's text content as
    parts (``input_text``; ``output_text`` for the assistant's)."""
    kind = item.get("type", "message")
    out = {"id": item.get("id") or item_id(INPUT_ID_PREFIX.get(kind, "item")), **item, "type": kind}
    out.setdefault("status", "completed")
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        out["content"] = [{"type": part, "text": item["content"]}]
    return out


def assistant_message(output: list[dict]) -> ChatMessage | None:
    """The answer as the next turn's history: its text and calls (its reasoning dropped; a call whose arguments are
    not a JSON object, cut by max_output_tokens or malformed, dropped too: a template could not render it)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"], arguments=item["arguments"]))
             for item in output if item["type"] == "function_call" and is_json_object(item["arguments"])]
    if not text and not calls:
        return None
    return ChatMessage(role="assistant", content=text, tool_calls=calls or None)


async def _answer(reply: Reply, stream, store: ResponseStore | None) -> AsyncIterator[tuple[str, dict]]:
    """The one reading of an answer, streamed or not: its events as (type, fields), the last one ending the response
    with the whole of it (stored, with ``store``). The engine's outputs are deltas."""
    assert stream.delta, "a Responses answer reads deltas (to_chat asks for them)"
    events = ResponseEvents(reply.ctx.strings if reply.req.wants_logprobs else None, reply.req.top_logprobs or 0)
    choice = reply.answer.stream()
    text, token_ids, cached, reason = "", [], 0, None
    yield "response.created", {"response": reply.body(None, [])}
    yield "response.in_progress", {"response": reply.body(None, [])}
    async for out in stream:
        cached = out.num_cached_tokens
        for c in out.outputs:
            text += c.text
            token_ids += c.token_ids
            for event in events.feed(choice.feed(text, final=c.finished), c.token_ids, c.logprobs):
                yield event
            reason = c.finish_reason if c.finished else reason
    for event in events.close(cut=reason == "length"):
        yield event
    # an answer that ends unfinished was aborted (the server draining)
    body = reply.body(reason or "abort", events.output, await reply.usage(token_ids, events.output, cached))
    if store is not None and body["status"] != "failed":
        store.put(reply.stored(body))
    yield f"response.{body['status']}", {"response": body}


def _start_in_background(reply: Reply, stream, store: ResponseStore) -> JSONResponse:
    """``background``: answer at once with the response in progress (stored), and make it in a task of its own;
    ``GET /v1/responses/{id}`` reads it, ``POST /v1/responses/{id}/cancel`` stops it."""
    body = reply.body(None, [])
    inputs = reply.input_items
    store.put(StoredResponse(body, [], inputs))

    async def run() -> None:
        last = body
        try:
            async for _, fields in _answer(reply, stream, store):  # stores the finished response
                last = fields.get("response", last)  # the lifecycle events', the last one whole
            if last["status"] == "failed":  # which _answer leaves out of the store
                store.put(StoredResponse(last, [], inputs))
        except asyncio.CancelledError:
            store.put(StoredResponse(reply.body("cancelled", []), [], inputs))
            raise
        except Exception as exc:  # kept as the stored response's error
            error = exc.body()["error"] if isinstance(exc, OpenAIError) else {"message": str(exc)}
            error = {"code": error.get("code") or "server_error", "message": error["message"]}
            store.put(StoredResponse(reply.body(None, [], error=error), [], inputs))
        finally:
            close_all([stream])
            store.tasks.pop(reply.id, None)

    store.tasks[reply.id] = asyncio.get_running_loop().create_task(run())
    return JSONResponse(body)


async def cancel(store: ResponseStore, response_id: str) -> dict:
    """Stop a background response being made; its stored state says ``cancelled``. A background response already
    over is returned as it is (cancelling is idempotent, as OpenAI's)."""
    stored = stored_response(store, response_id)
    task = store.tasks.get(response_id)
    if task is None and not stored.body["background"]:
        raise OpenAIError(400, f"response {response_id!r} was not made in the background; only a background "
                          "response can be cancelled", param="response_id", code="invalid_value")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return stored_response(store, response_id).body


async def delete(store: ResponseStore, response_id: str) -> dict:
    """Forget a stored response; one still being made in the background is stopped first."""
    stored_response(store, response_id)  # 404 for an unknown id
    if response_id in store.tasks:
        await cancel(store, response_id)
    store.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _full(reply: Reply, stream, store: ResponseStore | None) -> JSONResponse:
    """A whole answer: the last event's response (an error is raised, and answered with its status)."""
    async for _, fields in _answer(reply, stream, store):
        last = fields
    return JSONResponse(last["response"])


async def _stream(reply: Reply, stream, store: ResponseStore | None):
    """Server-sent events, numbered from 0; a failure after the first byte ends the response as failed."""
    sequence = 0

    def sse_event(kind: str, fields: dict) -> bytes:
        nonlocal sequence
        data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
        sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    try:
        async for kind, fields in _answer(reply, stream, store):
            yield sse_event(kind, fields)
    except Exception as exc:
        error = exc.body()["error"] if isinstance(exc, OpenAIError) else {"message": str(exc)}
        error = {"code": error.get("code") or "server_error", "message": error["message"]}
        yield sse_event("response.failed", {"response": reply.body(None, [], error=error)})
    finally:
        close_all([stream])


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
