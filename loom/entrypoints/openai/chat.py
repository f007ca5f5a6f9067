"""POST /v1/chat/completions: messages through the model's chat template; ``chat.completion`` or SSE chunks.

Streaming follows OpenAI's shape: a first chunk per choice with ``delta.role``, content deltas, a last chunk per
choice with an empty delta and its ``finish_reason``, a usage chunk (``choices: []``) when
``stream_options.include_usage``, then ``data: [DONE]``.

With tools (``tools.py``), a choice's text goes through its tool plan: the answer's ``message`` gets ``tool_calls``
and ``finish_reason`` is ``tool_calls``; a stream sends ``delta.tool_calls`` (index, id, type and name first, then
pieces of the arguments) where it would have sent content. With ``--reasoning-parser`` (``reasoning.py``) the
thinking block is split off first: ``message.reasoning_content`` / ``delta.reasoning_content``, and only what follows
it is content (or tool calls). ``chat_template_kwargs`` and ``continue_final_message`` reach the template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.lora import LoRARequest
from loom.engine.outputs import CompletionOutput
from loom.engine.reasoning import prompt_block
from loom.engine.sampling_params import SamplingParams
from loom.entrypoints.openai.beam import beam_params, beam_search, check_beam_request
from loom.entrypoints.openai.errors import bad_request
from loom.entrypoints.openai.protocol import ChatCompletionRequest
from loom.entrypoints.openai.reasoning import ReasoningParser, ReasoningStream
from loom.entrypoints.openai.serving import (
    SSE_HEADERS,
    ServingContext,
    chunk_usage,
    close_all,
    error_event,
    finals_of,
    new_id,
    now_s,
    prompt_scores,
    sse,
    unless_disconnected,
    usage,
    usage_of,
)
from loom.entrypoints.openai.tools import ToolPlan, finish_reason_of, plan_tools


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    if req.use_beam_search:
        return await unless_disconnected(_beam_chat(ctx, req), raw)
    run = await prepare_chat(ctx, req)
    request_id, created = new_id("chatcmpl"), now_s()
    streams = await ctx.open_streams(request_id, [run.prompt], run.params, time.time(), run.lora, run.priority,
                                     multi_modal_data=run.multi_modal_data)
    run = replace(run, multi_modal_data=None)  # the engine holds what it needs
    if req.stream:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None}
        return StreamingResponse(_stream(ctx, req, run.answer, streams[0], len(run.prompt), head),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    head = {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": None}
    try:
        return await unless_disconnected(_full(ctx, req, run.answer, streams, len(run.prompt), head), raw)
    finally:
        close_all(streams)


@dataclass(frozen=True, slots=True)
class ChatRun:
    """A checked chat request, ready to admit: its adapter, sampling, prompt ids and how its text becomes a message."""

    lora: LoRARequest | None
    params: SamplingParams
    prompt: list[int]
    answer: Answer
    priority: int = 0
    multi_modal_data: dict | None = None
    """A vision model's images ({"image": [...]}), their tokens in ``prompt``; None: no images."""


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest) -> ChatRun:
    """Everything before admission, each problem a 400 naming the field: model, tools, sampling, the rendered prompt,
    the grammar compiled. /v1/responses goes through here too."""
    lora = ctx.check_model(req.model)
    plan = plan_tools(req, ctx.tool_settings)
    params = req.sampling_params(plan.structured, ctx.sampling_defaults)
    # the engine starts a grammar after the thinking block where it can tell the block's tags (single tokens);
    # elsewhere a grammar constrains the whole output, which has no block to split off
    grammar_free = params.structured_outputs is None or ctx.think is not None
    reasoning = ctx.reasoning if grammar_free else None
    markers = (plan.parser.markers if plan.parser is not None else ()) + (reasoning.markers if reasoning else ())
    if markers and ctx.has_special_token(markers):
        params.skip_special_tokens = False  # the parsers must see the format's tokens (vLLM's parsers do the same)
    ctx.check_n(params.n)
    template = req.template_options(req.messages, req.add_generation_prompt)
    images = await ctx.load_images(req.messages)
    prompt = await ctx.apply_chat_template(req.messages, req.add_generation_prompt, tools=plan.tools,
                                           template=template, images=images)
    if reasoning is not None and ctx.think is not None:
        reasoning = reasoning.after_prompt(prompt_block(prompt, ctx.think))  # as the engine's gate reads it
    await ctx.compile_grammar(params, _grammar_param(req, plan))
    return ChatRun(lora, params, prompt, Answer(plan, reasoning, with_reasoning=ctx.reasoning is not None),
                   req.priority, {"image": images} if images else None)


async def _beam_chat(ctx: ServingContext, req: ChatCompletionRequest) -> JSONResponse:
    """``use_beam_search``: the n best beams as the n choices, best first (``beam.py``); a thinking block is split off
    as in any answer."""
    lora = ctx.check_model(req.model)
    ctx.check_n(req.n)
    template = req.template_options(req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_beam_request(req)
    if any(m.image_urls() for m in req.messages):
        raise bad_request("use_beam_search does not take images yet; sample instead", "use_beam_search")
    prompt = await ctx.apply_chat_template(req.messages, req.add_generation_prompt, template=template)
    params = beam_params(req, max_tokens, ctx.front.max_model_len, len(prompt), ctx.sampling_defaults.max_tokens)
    request_id = new_id("chatcmpl")
    out = await beam_search(ctx, request_id, prompt, params, lora, req.priority, req.skip_special_tokens)
    answer = Answer(ToolPlan(), ctx.reasoning, with_reasoning=ctx.reasoning is not None)
    choices = [{"index": c.index, "message": answer.message(c.text)[0], "logprobs": None,
                "finish_reason": c.finish_reason, "stop_reason": None} for c in out.outputs]
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": now_s(), "model": req.model,
                         "system_fingerprint": None, "choices": choices, "usage": usage([len(prompt)], [out])})


class Answer:
    """How a choice's text becomes its message: the reasoning split off first (``--reasoning-parser``), then the rest
    through the tool plan."""

    def __init__(self, plan: ToolPlan, reasoning: ReasoningParser | None, with_reasoning: bool):
        self.plan, self.reasoning = plan, reasoning
        self.with_reasoning = with_reasoning
        """Whether messages carry ``reasoning_content`` (a parser is configured, even if this answer is not split)."""

    def message(self, text: str) -> tuple[dict, bool]:
        """(the finished choice's message, whether it called tools)."""
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text)
        content, calls = self.plan.message(text) if text is not None else (None, [])
        message = {"role": "assistant", "content": content, "refusal": None}
        if self.with_reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return message, bool(calls)

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self.plan.stream(), self.reasoning.stream() if self.reasoning else None)


class ChoiceStream:
    """One streamed choice: its text so far -> the delta to send (reasoning pieces, then content or tool calls)."""

    def __init__(self, content, reasoning: ReasoningStream | None):
        self.content, self.reasoning = content, reasoning

    @property
    def called(self) -> bool:
        return self.content.called

    def feed(self, text: str, final: bool) -> dict:
        if self.reasoning is None:
            return self.content.feed(text, final=final)
        piece, rest = self.reasoning.feed(text, final=final)
        delta = {"reasoning_content": piece} if piece else {}
        if rest is not None:
            delta.update(self.content.feed(rest, final=final))
        return delta


def _grammar_param(req: ChatCompletionRequest, plan: ToolPlan) -> str:
    """The field a grammar that does not compile is blamed on."""
    if plan.structured is not None:
        return "tools"
    return "response_format" if req.response_format is not None else "structured_outputs"


def _logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids, logprobs) -> dict | None:
    if not req.logprobs or logprobs is None:
        return None
    return {"content": ctx.strings.chat_entries(token_ids, logprobs, req.top_logprobs or 0), "refusal": None}


async def _full(ctx, req: ChatCompletionRequest, answer: Answer, streams, prompt_len: int,
                head: dict) -> JSONResponse:
    finals = await finals_of(streams)
    choices = [_choice(ctx, req, answer, c) for c in finals[0].outputs]
    out = finals[0]
    return JSONResponse({**head, "choices": choices, "usage": usage([prompt_len], finals),
                         **prompt_scores(ctx, req, out.prompt_token_ids, out)})


def _choice(ctx, req, answer: Answer, c: CompletionOutput) -> dict:
    message, called = answer.message(c.text)
    return {
        "index": c.index,
        "message": message,
        "logprobs": _logprobs(ctx, req, c.token_ids, c.logprobs),
        "finish_reason": finish_reason_of(c.finish_reason, called),
        "stop_reason": c.stop_reason,
    }


def _chunk(head: dict, index: int, delta: dict, finish_reason=None, logprobs=None, extra=None) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return sse({**head, "choices": [choice], **(extra or {})})


async def _stream(ctx, req: ChatCompletionRequest, answer: Answer, stream, prompt_len: int, head: dict):
    """The stream's outputs are deltas (``output_kind="delta"``); the reasoning and tool parsers read each choice's
    text so far."""
    assert stream.delta, "a stream's outputs are deltas (ChatCompletionRequest.sampling_params)"
    choices = [answer.stream() for _ in range(req.n)]  # per choice: text so far -> the delta to send
    texts = [""] * req.n
    done = [False] * req.n
    cached = 0
    own_tokens = [0] * req.n  # per choice (a chunk's continuous usage counts its choice's, as vLLM's)
    try:
        for index in range(req.n):
            yield _chunk(head, index, {"role": "assistant", "content": ""},
                         extra=chunk_usage(req, [prompt_len], 0, 0))
        async for out in stream:
            cached = out.num_cached_tokens
            for c in out.outputs:
                own_tokens[c.index] += len(c.token_ids)
                if done[c.index]:
                    continue
                texts[c.index] += c.text
                delta = choices[c.index].feed(texts[c.index], final=c.finished)
                extra = chunk_usage(req, [prompt_len], own_tokens[c.index], cached)
                if delta or (req.logprobs and c.token_ids):
                    logprobs = _logprobs(ctx, req, c.token_ids, c.logprobs)
                    yield _chunk(head, c.index, delta or {"content": ""}, None, logprobs, extra)
                if c.finished:
                    reason = finish_reason_of(c.finish_reason, choices[c.index].called)
                    yield _chunk(head, c.index, {}, reason, extra=extra)
                done[c.index] = c.finished
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage_of([prompt_len], sum(own_tokens), cached)})
        yield sse("[DONE]")
    except Exception as exc:  # mid-stream failure: an error event, then the end marker
        yield error_event(exc)
        yield sse("[DONE]")
    finally:
        close_all([stream])
