"""The routes: /v1/completions, /v1/chat/completions, /v1/models (Bearer key when set), /tokenize, /detokenize."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request

from loom.server.openai.chat import create_chat_completion
from loom.server.openai.completions import create_completion
from loom.server.openai.errors import OpenAIError, OpenAIRoute
from loom.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from loom.server.openai.serving import ServingContext, now_s


def bearer_check(api_key: str | None):
    """A dependency that answers 401 unless ``Authorization: Bearer <api_key>`` (a no-op without a key)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def build_routers(ctx: ServingContext, api_key: str | None) -> list[APIRouter]:
    v1 = APIRouter(prefix="/v1", route_class=OpenAIRoute, dependencies=[Depends(bearer_check(api_key))],
                   tags=["openai"])
    created = now_s()

    @v1.post("/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(ctx, req, raw)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(ctx, req, raw)

    @v1.get("/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "loom",
                 "root": str(ctx.front.engine.model_path), "max_model_len": ctx.front.max_model_len}
                for name in ctx.model_names]
        return {"object": "list", "data": data}

    tools = APIRouter(route_class=OpenAIRoute, tags=["tokens"])

    @tools.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        if req.model is not None:
            ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = ctx.apply_chat_template([m.as_template_dict() for m in req.messages], req.add_generation_prompt)
        else:
            ids = list(ctx.front.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        return {"count": len(ids), "max_model_len": ctx.front.max_model_len, "tokens": ids}

    @tools.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if req.model is not None:
            ctx.check_model(req.model)
        vocab = len(ctx.front.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return {"prompt": ctx.front.tokenizer.decode(req.tokens)}

    return [v1, tools]
