"""Inference routes on the main app: POST /predictions/{model} (TorchServe's path), POST /v1/embeddings
(OpenAI's shape) and GET /ping (readiness).

Errors are JSON ``{"error": {"message", "type", "code"}}``: 400 bad input, 404 unknown model, 413 too many inputs,
503 + Retry-After when the model's queue is full, 504 when a request waited past its deadline. The app's ``Guard``
bounds every body and requires a JSON content type on /v1/embeddings; /predictions takes any content type.

POST /predictions/{name} is answered by :class:`PredictionRoute`, a plain ASGI app that the main app runs behind its
``Guard`` and in front of FastAPI's router (``raw_routes``): FastAPI's request handling (routing, dependency
solving, Request/Response objects, its exception middleware) was about 0.2 ms of the lone request's ~1.1 ms
overhead on the 2-core EPYC. The FastAPI route of the same path stays for the OpenAPI schema and gives the same
answers (both call :func:`predict`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

from fastapi import APIRouter, Request, Response

from loom.batching.batcher import DeadlineExceeded, QueueFull
from loom.batching.model import ItemFailed, ModelUnavailable
from loom.batching.server import ModelNotFound, ModelServer

MAX_EMBEDDING_INPUTS = 2048
RAW_BODY_PREFIXES = ("/predictions/",)
"""Routes whose bodies may be images, text or JSON (the handler decodes them)."""

try:  # orjson is several times faster on float lists when present; json is the fallback
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(value: Any) -> bytes:
        return json.dumps(value).encode()


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def json_body(value: Any, status: int = 200) -> tuple[bytes, int]:
    """(the JSON bytes, status); a value JSON cannot hold becomes a 500 that says so."""
    try:
        return _dumps(value), status
    except TypeError as exc:  # a handler returned a tensor or another object JSON cannot hold
        message = f"the handler's result is not JSON-serialisable ({exc}); return lists, numbers, strings or dicts"
        return _dumps({"error": {"message": message, "type": "server_error", "code": 500}}), 500


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> Response:
    body, status = json_body(value, status)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_value(err: HTTPError) -> dict:
    return {"error": {"message": str(err), "type": err.kind, "code": err.status}}


def error_response(err: HTTPError) -> Response:
    return json_response(error_value(err), err.status, err.headers)


def build_inference_router(server: ModelServer) -> APIRouter:
    router = APIRouter(tags=["model server"])

    @router.post("/predictions/{name}")
    async def predictions(name: str, request: Request) -> Response:
        status, body, headers = await predict(server, name, await request.body(),
                                              request.headers.get("content-type", ""))
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            return json_response(await _embeddings(server, await _read_body(request)))
        except HTTPError as err:
            return error_response(err)

    @router.get("/ping")
    async def ping() -> Response:
        ready = server.is_ready()
        body = {"status": "Healthy" if ready else "Unhealthy", "models": server.summary()}
        return json_response(body, 200 if ready else 503)

    return router


async def predict(server: ModelServer, name: str, body: bytes, content_type: str) -> tuple[int, bytes, dict]:
    """One POST /predictions/{name}: (status, JSON body, headers), errors included."""
    try:
        model = _model(server, name)
        if not body:
            raise HTTPError(400, _EMPTY_BODY)
        timing: dict = {}
        value = await _submit(model, _decode_body(body, content_type), timing)
        answer, status = json_body(value)
        return status, answer, timing_headers(timing)
    except HTTPError as err:
        return err.status, json_body(error_value(err))[0], err.headers


class PredictionRoute:
    """POST /predictions/{name} as a plain ASGI app: ``await route(scope, receive, send, name)``."""

    prefix = "/predictions/"
    methods = ("POST",)

    def __init__(self, server: ModelServer):
        self.server = server

    async def __call__(self, scope, receive, send, name: str) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), "")
        status, body, headers = await predict(self.server, name, b"".join(chunks), content_type)
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


_EMPTY_BODY = "empty body; send JSON, text or the raw bytes of the input (an image, say)"


async def _read_body(request: Request) -> bytes:
    body = await request.body()
    if not body:
        raise HTTPError(400, _EMPTY_BODY)
    return body


def _decode_body(body: bytes, content_type: str) -> Any:
    """JSON → parsed value; text/* → str; anything else (images) → bytes, for the handler's decode."""
    if "json" in content_type:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise HTTPError(400, f"body is not valid JSON ({exc}); fix it or send another content type") from None
        except RecursionError:
            raise HTTPError(400, "body JSON nests too deeply; flatten it") from None
    if content_type.startswith("text/"):
        return body.decode("utf-8", errors="replace")
    return body


def _model(server: ModelServer, name: str):
    try:
        return server.get(name)
    except ModelNotFound as exc:
        raise HTTPError(404, str(exc), "not_found_error") from None


def timing_headers(timing: dict) -> dict[str, str]:
    """X-Loom-Queue-Ms / X-Loom-Inference-Ms: where a request's time went (the rest is HTTP and transport)."""
    return {f"X-Loom-{key[:-3].title()}-Ms": f"{value:.3f}" for key, value in timing.items()}


async def _submit(model, payload: Any, timing: dict | None = None) -> Any:
    return await _answer(model.submit(payload, timing), model)


async def _answer(result, model) -> Any:
    try:
        return await result
    except (QueueFull, ModelUnavailable, DeadlineExceeded, ItemFailed) as exc:
        raise _http_error(exc, model) from None


def _http_error(exc: Exception, model) -> HTTPError:
    if isinstance(exc, QueueFull):
        return HTTPError(503, f"model {model.config.name} is overloaded: {exc}; retry later", "overloaded_error",
                         {"Retry-After": str(model.retry_after_s())})
    if isinstance(exc, ModelUnavailable):
        return HTTPError(503, str(exc), "unavailable_error", {"Retry-After": "1"})
    if isinstance(exc, DeadlineExceeded):
        return HTTPError(504, f"{exc}; the server is busy, retry later or raise request_timeout", "timeout_error")
    return HTTPError(exc.status, exc.message, "invalid_request_error" if exc.status < 500 else "server_error")


async def _embeddings(server: ModelServer, body: bytes) -> dict:
    request = _decode_body(body, "application/json")
    if not isinstance(request, dict):
        raise HTTPError(400, 'body must be a JSON object like {"model": "minilm", "input": ["text", ...]}')
    inputs = _embedding_inputs(request.get("input"))
    name = request.get("model")
    if not name and len(server.models) == 1:
        name = next(iter(server.models))
    model = _model(server, str(name or ""))
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    try:  # every input queued at once or none (503 before any is queued): one request never fills the queue
        waits = model.submit_all(inputs)
    except (QueueFull, ModelUnavailable) as exc:
        raise _http_error(exc, model) from None
    results = await asyncio.gather(*(_answer(wait, model) for wait in waits), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise (result if isinstance(result, HTTPError)
                   else HTTPError(500, f"embedding failed: {result}", "server_error"))
    data, tokens = [], 0
    for i, result in enumerate(results):
        if not isinstance(result, dict) or "embedding" not in result:
            raise HTTPError(400, f"model {model.config.name} (handler {model.config.handler}) "
                            "does not return embeddings")
        tokens += int(result.get("tokens", 0))
        data.append({"object": "embedding", "index": i, "embedding": _encode(result["embedding"], encoding)})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model.config.name, "usage": usage}


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise HTTPError(400, "'input' must be a non-empty string or list of strings "
                        "(token-id inputs are not supported)")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise HTTPError(413, f"'input' has {len(value)} items; send at most {MAX_EMBEDDING_INPUTS} per request")
    return value


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
