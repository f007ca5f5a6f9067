"""POST /v1/chat/completions: messages through the model's chat template; ``chat.completion`` or SSE chunks.

Streaming follows OpenAI's shape: a first chunk per choice with ``delta.role``, content deltas, a last chunk per
choice with an empty delta and its ``finish_reason``, a usage chunk (``choices: []``) when
``stream_options.include_usage``, then ``data: [DONE]``.

With tools (``tools.py``), a choice's text goes through its tool plan: the answer's ``message`` gets ``tool_calls``
and ``finish_reason`` is ``tool_calls``; a stream sends ``delta.tool_calls`` (index, id, type and name first, then
pieces of the arguments) where it would have sent content.
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.outputs import CompletionOutput
from loom.entrypoints.openai.protocol import ChatCompletionRequest
from loom.entrypoints.openai.serving import (
    SSE_HEADERS,
    ServingContext,
    close_all,
    error_event,
    finals_of,
    new_id,
    now_s,
    sse,
    unless_disconnected,
    usage,
    usage_of,
)
from loom.entrypoints.openai.tools import ToolPlan, finish_reason_of, plan_tools


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    lora = ctx.check_model(req.model)
    plan = plan_tools(req, ctx.tool_settings)
    params = req.sampling_params(plan.structured)
    if plan.parser is not None and ctx.has_special_token(plan.parser.markers):
        params.skip_special_tokens = False  # the parser must see the format's tokens (vLLM's parsers do the same)
    ctx.check_n(params.n)
    prompt = await ctx.apply_chat_template(req.messages, req.add_generation_prompt, tools=plan.tools)
    await ctx.compile_grammar(params, _grammar_param(req, plan))
    request_id, created = new_id("chatcmpl"), now_s()
    streams = await ctx.open_streams(request_id, [prompt], params, time.time(), lora)
    if req.stream:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None}
        return StreamingResponse(_stream(ctx, req, plan, streams[0], len(prompt), head),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    head = {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": None}
    try:
        return await unless_disconnected(_full(ctx, req, plan, streams, len(prompt), head), raw)
    finally:
        close_all(streams)


def _grammar_param(req: ChatCompletionRequest, plan: ToolPlan) -> str:
    """The field a grammar that does not compile is blamed on."""
    if plan.structured is not None:
        return "tools"
    return "response_format" if req.response_format is not None else "structured_outputs"


def _logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids, logprobs) -> dict | None:
    if not req.logprobs or logprobs is None:
        return None
    return {"content": ctx.strings.chat_entries(token_ids, logprobs, req.top_logprobs or 0), "refusal": None}


async def _full(ctx, req: ChatCompletionRequest, plan: ToolPlan, streams, prompt_len: int, head: dict) -> JSONResponse:
    finals = await finals_of(streams)
    choices = [_choice(ctx, req, plan, c) for c in finals[0].outputs]
    return JSONResponse({**head, "choices": choices, "usage": usage([prompt_len], finals)})


def _choice(ctx, req, plan: ToolPlan, c: CompletionOutput) -> dict:
    content, calls = plan.message(c.text)
    message = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "index": c.index,
        "message": message,
        "logprobs": _logprobs(ctx, req, c.token_ids, c.logprobs),
        "finish_reason": finish_reason_of(c.finish_reason, bool(calls)),
        "stop_reason": c.stop_reason,
    }


def _chunk(head: dict, index: int, delta: dict, finish_reason=None, logprobs=None, extra=None) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return sse({**head, "choices": [choice], **(extra or {})})


async def _stream(ctx, req: ChatCompletionRequest, plan: ToolPlan, stream, prompt_len: int, head: dict):
    """The stream's outputs are deltas (``output_kind="delta"``); a tool parser reads each choice's text so far."""
    assert stream.delta, "a stream's outputs are deltas (ChatCompletionRequest.sampling_params)"
    extra = {"usage": None} if req.include_usage else None
    choices = [plan.stream() for _ in range(req.n)]  # per choice: text so far -> the delta to send
    texts = [""] * req.n
    done = [False] * req.n
    num_tokens = cached = 0
    try:
        for index in range(req.n):
            yield _chunk(head, index, {"role": "assistant", "content": ""}, extra=extra)
        async for out in stream:
            cached = out.num_cached_tokens
            for c in out.outputs:
                num_tokens += len(c.token_ids)
                if done[c.index]:
                    continue
                texts[c.index] += c.text
                delta = choices[c.index].feed(texts[c.index], final=c.finished)
                if delta or (req.logprobs and c.token_ids):
                    logprobs = _logprobs(ctx, req, c.token_ids, c.logprobs)
                    yield _chunk(head, c.index, delta or {"content": ""}, None, logprobs, extra)
                if c.finished:
                    reason = finish_reason_of(c.finish_reason, choices[c.index].called)
                    yield _chunk(head, c.index, {}, reason, extra=extra)
                done[c.index] = c.finished
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage_of([prompt_len], num_tokens, cached)})
        yield sse("[DONE]")
    except Exception as exc:  # mid-stream failure: an error event, then the end marker
        yield error_event(exc)
        yield sse("[DONE]")
    finally:
        close_all([stream])
