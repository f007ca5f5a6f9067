"""The routes: /v1/completions, /v1/chat/completions, /v1/responses (and its stored responses), /v1/models,
/tokenize, /detokenize.

Authentication is the app's (``loom.server.guard``): one key for every component's routes."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from loom.entrypoints.openai.async_engine import EngineDead
from loom.entrypoints.openai.chat import create_chat_completion
from loom.entrypoints.openai.completions import create_completion
from loom.entrypoints.openai.errors import ERROR_RESPONSES, OpenAIError, OpenAIRoute
from loom.entrypoints.openai.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from loom.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from loom.entrypoints.openai.responses import cancel, create_response, delete, input_items_page, stored_response
from loom.entrypoints.openai.responses_protocol import ResponsesRequest
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

    @v1.post("/responses", responses=STREAMS)
    async def responses(req: ResponsesRequest, raw: Request):
        return await create_response(ctx, ctx.responses, req, raw)

    @v1.get("/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return stored_response(ctx.responses, response_id).body

    @v1.delete("/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        return await delete(ctx.responses, response_id)

    @v1.get("/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, limit: int = 20, order: str = "desc",
                                   after: str | None = None) -> dict:
        return input_items_page(stored_response(ctx.responses, response_id), limit, order, after)

    @v1.post("/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> dict:
        return await cancel(ctx.responses, response_id)

    @v1.get("/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "loom",
                 "root": str(ctx.front.engine.model_path), "parent": None, "max_model_len": ctx.front.max_model_len}
                for name in ctx.model_names]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "loom", "root": lora.lora_path,
                  "parent": ctx.model_name, "max_model_len": ctx.front.max_model_len}
                 for name, lora in (ctx.loras.items() if ctx.loras is not None else [])]
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
                                                tools=template_tools(req.tools),
                                                template=req.template_options(req.messages, req.add_generation_prompt))
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


def build_lora_router(ctx: ServingContext) -> APIRouter:
    """vLLM's runtime adapter routes (only with --allow-runtime-lora-updating)."""
    router = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["lora"], responses=ERROR_RESPONSES)

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> dict:
        await load_adapter(ctx, req.lora_name, req.lora_path, confine=True)
        return {"object": "lora_adapter", "id": req.lora_name, "parent": ctx.model_name,
                "message": f"LoRA adapter {req.lora_name!r} added"}

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> dict:
        removed = ctx.loras.remove(req.lora_name)
        if removed is None:
            raise OpenAIError(404, f"no LoRA adapter is named {req.lora_name!r}; GET /v1/models lists them",
                              param="lora_name", code="model_not_found")
        try:  # on the engine thread, as every engine call (the engine may be in another process)
            await ctx.front.call(ctx.front.engine.lora.remove, removed.lora_int_id)  # running requests keep it
        except EngineDead:
            pass  # nothing left to forget it in
        return {"object": "lora_adapter", "id": req.lora_name, "message": f"LoRA adapter {req.lora_name!r} removed"}

    return router


async def load_adapter(ctx: ServingContext, name: str, path: str, confine: bool) -> None:
    """Register adapter ``name``: check the name, read and check the weights off the event loop, then serve it. A
    folder that is missing, unreadable or not an adapter of this model is a 400 that does not echo server paths; an
    engine that is not running is a 503, as for generation."""
    try:
        request = ctx.loras.new_request(name, path, confine)
        await ctx.front.call(ctx.front.engine.lora.get, request)  # torch work stays on the engine thread
        ctx.loras.add(request)
    except EngineDead as exc:
        raise OpenAIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"}) from None
    except ValueError as exc:
        raise OpenAIError(400, f"cannot load LoRA adapter {name!r}: {exc}", param="lora_path") from None
    except OSError:
        raise OpenAIError(400, f"cannot load LoRA adapter {name!r}: its folder or files cannot be read",
                          param="lora_path") from None
