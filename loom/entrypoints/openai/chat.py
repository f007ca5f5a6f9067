"""POST /v1/chat/completions: messages through the model's chat template; ``chat.completion`` or SSE chunks.

Streaming follows OpenAI's shape: a first chunk per choice with ``delta.role``, content deltas, a last chunk per
choice with an empty delta and its ``finish_reason``, a usage chunk (``choices: []``) when
``stream_options.include_usage``, then ``data: [DONE]``.
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
)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    lora = ctx.check_model(req.model)
    params = req.sampling_params()
    ctx.check_n(params.n)
    messages = [m.as_template_dict() for m in req.messages]
    prompt = await ctx.apply_chat_template(messages, req.add_generation_prompt)
    await ctx.compile_grammar(params, "response_format" if req.response_format is not None else "structured_outputs")
    request_id, created = new_id("chatcmpl"), now_s()
    streams = await ctx.open_streams(request_id, [prompt], params, time.time(), lora)
    if req.stream:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None}
        return StreamingResponse(_stream(ctx, req, streams[0], len(prompt), head), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    head = {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": None}
    try:
        return await unless_disconnected(_full(ctx, req, streams, len(prompt), head), raw)
    finally:
        close_all(streams)


def _logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids, logprobs) -> dict | None:
    if not req.logprobs or logprobs is None:
        return None
    return {"content": ctx.strings.chat_entries(token_ids, logprobs, req.top_logprobs or 0), "refusal": None}


async def _full(ctx, req: ChatCompletionRequest, streams, prompt_len: int, head: dict) -> JSONResponse:
    finals = await finals_of(streams)
    choices = [_choice(ctx, req, c) for c in finals[0].outputs]
    return JSONResponse({**head, "choices": choices, "usage": usage([prompt_len], finals)})


def _choice(ctx, req, c: CompletionOutput) -> dict:
    return {
        "index": c.index,
        "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": _logprobs(ctx, req, c.token_ids, c.logprobs),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def _chunk(head: dict, index: int, delta: dict, finish_reason=None, logprobs=None, extra=None) -> str:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return sse({**head, "choices": [choice], **(extra or {})})


async def _stream(ctx, req: ChatCompletionRequest, stream, prompt_len: int, head: dict):
    extra = {"usage": None} if req.include_usage else None
    sent = [(0, 0, False)] * req.n  # per choice: (chars, tokens, finished)
    last = None
    try:
        for index in range(req.n):
            yield _chunk(head, index, {"role": "assistant", "content": ""}, extra=extra)
        async for out in stream:
            last = out
            for c in out.outputs:
                chars, toks, done = sent[c.index]
                if done:
                    continue
                text, new_ids = c.text[chars:], c.token_ids[toks:]
                lps = c.logprobs[toks:] if c.logprobs is not None else None
                if text or (req.logprobs and new_ids):
                    yield _chunk(head, c.index, {"content": text}, None, _logprobs(ctx, req, new_ids, lps), extra)
                    sent[c.index] = (len(c.text), len(c.token_ids), False)
                if c.finished:
                    yield _chunk(head, c.index, {}, c.finish_reason, extra=extra)
                    sent[c.index] = (len(c.text), len(c.token_ids), True)
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage([prompt_len], [last])})
        yield sse("[DONE]")
    except Exception as exc:  # mid-stream failure: an error event, then the end marker
        yield error_event(exc)
        yield sse("[DONE]")
    finally:
        close_all([stream])
