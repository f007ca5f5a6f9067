"""The routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize.

Authentication is the app's (``loom.server.guard``): one key for every component's routes."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from loom.entrypoints.openai.chat import create_chat_completion
from loom.entrypoints.openai.completions import create_completion
from loom.entrypoints.openai.errors import ERROR_RESPONSES, OpenAIError, OpenAIRoute
from loom.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from loom.entrypoints.openai.serving import ServingContext, now_s
from loom.entrypoints.openai.tools import template_tools

STREAMS = {200: {"description": "a JSON object, or server-sent events with stream: true",
                 "content": {"application/json": {}, "text/event-stream": {}}}}


def build_routers(ctx: ServingContext) -> list[APIRouter]:
    v1 = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["openai"], responses=ERROR_RESPONSES)
    created = now_s()

    @v1.post("/completions", responses=STREAMS)
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @v1.post("/chat/completions", responses=STREAMS)
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, req, raw)

    @v1.get("/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "loom",
                 "root": str(ctx.front.engine.model_path), "max_model_len": ctx.front.max_model_len}
                for name in ctx.model_names]
        return {"object": "list", "data": data}

    tools = APIRouter(route_class=OpenAIRoute, tags=["tokens"], responses=ERROR_RESPONSES)

    @tools.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> Response:
        if req.model is not None:
            ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = await ctx.apply_chat_template(req.messages, req.add_generation_prompt, within_context=False,
                                                tools=template_tools(req.tools))
        else:
            ids = await ctx.encoder.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        body = {"count": len(ids), "max_model_len": ctx.front.max_model_len, "tokens": ids}
        return Response(await ctx.encoder.run(json.dumps, body), media_type="application/json")  # rendered off the loop

    @tools.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if req.model is not None:
            ctx.check_model(req.model)
        vocab = len(ctx.front.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return {"prompt": await ctx.encoder.decode(req.tokens)}

    return [v1, tools]
