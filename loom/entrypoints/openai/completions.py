"""POST /v1/completions: text (or token-id) prompts in, ``text_completion`` objects or SSE chunks out."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.outputs import CompletionOutput
from loom.entrypoints.openai.beam import beam_params, beam_searches, check_beam_request
from loom.entrypoints.openai.protocol import CompletionRequest
from loom.entrypoints.openai.serving import (
    SSE_HEADERS,
    ServingContext,
    chunk_usage,
    close_all,
    error_event,
    finals_of,
    merged,
    new_id,
    now_s,
    prompt_scores,
    sse,
    unless_disconnected,
    usage,
    usage_of,
)


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    lora = ctx.check_model(req.model)
    if req.use_beam_search:
        check_beam_request(req)
    params = req.sampling_params(ctx.sampling_defaults) if not req.use_beam_search else None
    raw_prompts = req.prompts()
    ctx.check_n(req.n, len(raw_prompts))
    ctx.encoder.check_chars(sum(len(p) for p in raw_prompts if isinstance(p, str)))
    prompts = [await ctx.encode(p) if isinstance(p, str) else list(p) for p in raw_prompts]
    if params is None:
        return await unless_disconnected(_beam_completion(ctx, req, prompts, lora), raw)
    await ctx.compile_grammar(params, "structured_outputs")
    request_id, created = new_id("cmpl"), now_s()
    streams = await ctx.open_streams(request_id, prompts, params, time.time(), lora, req.priority)  # checks ids too
    try:
        echo = [await ctx.encoder.decode(p) if req.echo else "" for p in prompts]
    except BaseException:
        close_all(streams)
        raise
    head = {"id": request_id, "object": "text_completion", "created": created, "model": req.model}
    if req.stream:
        return StreamingResponse(_stream(ctx, req, streams, prompts, echo, head), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        return await unless_disconnected(_full(ctx, req, streams, prompts, echo, head), raw)
    finally:
        close_all(streams)


async def _full(ctx, req: CompletionRequest, streams, prompts, echo, head) -> JSONResponse:
    finals = await finals_of(streams)
    scores = [prompt_scores(ctx, req, prompts[i], out) for i, out in enumerate(finals)]  # once for the n choices
    choices = [
        _choice(ctx, req, i * req.n + c.index, echo[i] + c.text, c, c.token_ids, c.logprobs, len(echo[i]),
                _echoed(req, prompts[i], out.prompt_logprobs)) | scores[i]
        for i, out in enumerate(finals)
        for c in out.outputs
    ]
    body = {**head, "choices": choices, "usage": usage([len(p) for p in prompts], finals), "system_fingerprint": None}
    return JSONResponse(body)


async def _beam_completion(ctx, req: CompletionRequest, prompts: list[list[int]], lora) -> JSONResponse:
    """``use_beam_search``: the n best beams of each prompt as its n choices, best first (``beam.py``)."""
    params = [beam_params(req, req.max_tokens, ctx.front.max_model_len, len(p), ctx.sampling_defaults.max_tokens)
              for p in prompts]
    request_id = new_id("cmpl")
    outs = await beam_searches(ctx, request_id, prompts, params, lora, req.priority, req.skip_special_tokens)
    choices = [{"index": i * req.n + c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                "stop_reason": None} for i, out in enumerate(outs) for c in out.outputs]
    head = {"id": request_id, "object": "text_completion", "created": now_s(), "model": req.model}
    return JSONResponse({**head, "choices": choices, "usage": usage([len(p) for p in prompts], outs),
                         "system_fingerprint": None})


def _echoed(req: CompletionRequest, prompt: list[int], prompt_logprobs) -> tuple[list[int], list] | None:
    """With ``echo`` and ``logprobs``: the prompt's tokens and their scores, which lead the choice's logprobs."""
    return (prompt, prompt_logprobs) if req.echo and prompt_logprobs is not None else None


def _choice(ctx, req, index: int, text: str, c: CompletionOutput, token_ids, logprobs, offset: int,
            echoed: tuple[list[int], list] | None = None) -> dict:
    lp = None
    if req.logprobs is not None and logprobs is not None:
        lp = ctx.strings.completion_logprobs(token_ids, logprobs, req.logprobs, offset)
        if echoed is not None:  # the prompt's tokens first (the first one unscored), as vLLM and OpenAI echo them
            head = ctx.strings.completion_logprobs(*echoed, req.logprobs)
            lp = {key: head[key] + lp[key] for key in lp}
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


async def _stream(ctx, req: CompletionRequest, streams, prompts, echo, head):
    """Streams' outputs are deltas (``output_kind="delta"``): each chunk sends a completion's new text."""
    assert all(s.delta for s in streams), "a stream's outputs are deltas (CompletionRequest.sampling_params)"
    sent: dict[tuple[int, int], tuple[int, bool]] = {}  # (prompt, completion) -> (characters sent, finished)
    cached = [0] * len(streams)
    own_tokens: dict[tuple[int, int], int] = {}  # per choice (a chunk's continuous usage counts its choice's)
    scored: dict[int, tuple[list, dict]] = {}  # prompt -> its scores and prompt_logprobs field (a delta carries them)
    try:
        async for i, out in merged(streams):
            cached[i] = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                scored[i] = (out.prompt_logprobs, prompt_scores(ctx, req, prompts[i], out))
            for c in out.outputs:
                own_tokens[(i, c.index)] = own_tokens.get((i, c.index), 0) + len(c.token_ids)
                chars, done = sent.get((i, c.index), (0, False))
                wants_lp = req.logprobs is not None and bool(c.token_ids)
                if done or not (c.text or c.finished or wants_lp):
                    continue
                first = (i, c.index) not in sent
                prefix = echo[i] if first else ""
                echoed = _echoed(req, prompts[i], scored[i][0]) if first and i in scored else None
                choice = _choice(ctx, req, i * req.n + c.index, prefix + c.text, c, c.token_ids, c.logprobs,
                                 chars + len(prefix), echoed)
                if first and i in scored:
                    choice |= scored[i][1]
                sent[(i, c.index)] = (chars + len(prefix) + len(c.text), c.finished)  # text offsets count the echo
                yield sse({**head, "choices": [choice],
                           **chunk_usage(req, [len(prompts[i])], own_tokens[(i, c.index)], cached[i])})
        if req.include_usage:
            total = usage_of([len(p) for p in prompts], sum(own_tokens.values()), sum(cached))
            yield sse({**head, "choices": [], "usage": total})
        yield sse("[DONE]")
    except Exception as exc:  # mid-stream failure: an error event, then the end marker
        yield error_event(exc)
        yield sse("[DONE]")
    finally:
        close_all(streams)
