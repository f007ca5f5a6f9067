"""Inference routes on the main app: POST /predictions/{model} (TorchServe's path), POST /v1/embeddings
(OpenAI's shape), POST /v1/rerank (the shape vLLM, Jina and Cohere v1 answer; also /rerank) and POST /v1/score
(vLLM's) for cross-encoders, and GET /ping (readiness).

Errors are JSON ``{"error": {"message", "type", "code"}}``: 400 bad input, 404 unknown model, 413 too many inputs,
503 + Retry-After when the model's queue is full, 504 when a request waited past its deadline. The app's ``Guard``
bounds every body and requires a JSON content type on the /v1 routes; /predictions takes any content type.

POST /predictions/{name} is answered by :class:`PredictionRoute`, a plain ASGI app that the main app runs behind its
``Guard`` and in front of FastAPI's router (``raw_routes``): FastAPI's request handling (routing, dependency
solving, Request/Response objects, its exception middleware) was about 0.2 ms of the lone request's ~1.1 ms
overhead on the 2-core EPYC. The FastAPI route of the same path stays for the OpenAPI schema and gives the same
answers (both call :func:`predict`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import struct
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from loom.batching.batcher import DeadlineExceeded, QueueFull
from loom.batching.handler import WHOLE_REQUEST_HANDLERS, Raw, RequestData
from loom.batching.model import ItemFailed, ModelUnavailable
from loom.batching.server import ModelNotFound, ModelServer

MAX_EMBEDDING_INPUTS = 2048
MAX_RERANK_DOCUMENTS = 1024
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
                                              request.headers.get("content-type", ""),
                                              {k.lower(): v for k, v in request.headers.items()})
        return Response(body, status_code=status, headers=headers)

    for path, answer in (("/v1/embeddings", _embeddings), ("/v1/rerank", _rerank), ("/rerank", _rerank),
                         ("/v1/score", _score)):
        router.add_api_route(path, _json_route(server, answer), methods=["POST"])

    @router.get("/ping")
    async def ping() -> Response:
        ready = server.is_ready()
        body = {"status": "Healthy" if ready else "Unhealthy", "models": server.summary()}
        return json_response(body, 200 if ready else 503)

    return router


def _json_route(server: ModelServer, answer):
    """A POST route whose JSON body ``answer(server, body)`` turns into the JSON reply (HTTPError: its status)."""

    async def route(request: Request) -> Response:
        try:
            return json_response(await answer(server, await _read_body(request)))
        except HTTPError as err:
            return error_response(err)

    return route


async def predict(server: ModelServer, name: str, body: bytes, content_type: str,
                  request_headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    """One POST /predictions/{name}: (status, body, headers with its content-type), errors included.
    ``request_headers`` (lower-case names) go to whole-request handlers (``RequestData``)."""
    json_type = {"content-type": "application/json"}
    try:
        model = _model(server, name)
        if not body:
            raise HTTPError(400, _EMPTY_BODY)
        timing: dict = {}
        if model.config.handler in WHOLE_REQUEST_HANDLERS:  # a form is parsed off the event loop
            parse = functools.partial(_request_data, body, content_type,
                                      request_headers or {"content-type": content_type})
            payload = await asyncio.to_thread(parse) if _is_form(content_type) else parse()
        else:
            payload = _decode_body(body, content_type)
        value = await _submit(model, payload, timing)
        if isinstance(value, Raw):  # sent as it is (a TorchServe handler's text or bytes, say)
            return 200, value.body, {**timing_headers(timing), "content-type": value.content_type}
        answer, status = json_body(value)
        return status, answer, {**timing_headers(timing), **json_type}
    except HTTPError as err:
        return err.status, json_body(error_value(err))[0], {**err.headers, **json_type}


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
        request_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, body, headers = await predict(self.server, name, b"".join(chunks),
                                              request_headers.get("content-type", ""), request_headers)
        raw = [(b"content-length", str(len(body)).encode())]
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


MAX_FORM_PARTS = 1000
"""Parts of a multipart/form-data body (Starlette's default bound): more is a 413."""


def _is_form(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/form-data")


def _request_data(body: bytes, content_type: str, headers: dict[str, str]) -> RequestData:
    """A whole request: a multipart/form-data body's fields by name (TorchServe's way: each decoded by its part's
    content type, bytes without one), any other body decoded as for every handler."""
    if not _is_form(content_type):
        return RequestData(_decode_body(body, content_type), headers)
    from email import policy
    from email.parser import BytesParser

    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if boundary is None:
        raise HTTPError(400, "a multipart/form-data body needs a boundary in its Content-Type (curl -F sets one)")
    if body.count(b"--" + boundary.group(1).encode("latin-1", "replace")) > MAX_FORM_PARTS + 1:
        raise HTTPError(413, f"the form has more than {MAX_FORM_PARTS} parts; send fewer fields")

    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    form, types = {}, {}
    for part in parts:
        field_name = part.get_param("name", header="content-disposition")
        if not field_name:
            continue
        value = part.get_payload(decode=True) or b""
        part_type = part.get_content_type() if part.get("content-type") else ""
        types[field_name] = part_type
        form[field_name] = _decode_body(value, part_type) if part_type else value
    if not form:
        raise HTTPError(400, "the multipart/form-data body has no named fields (or no boundary): send fields as "
                        "curl -F name=@file does, or the raw bytes with another content type")
    return RequestData(None, headers, form, types)


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
    request = _json_request(body, '{"model": "minilm", "input": ["text", ...]}')
    inputs = _embedding_inputs(request.get("input"))
    model = _named_model(server, request)
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    results = await _run_all(model, inputs, "embedding")
    data, tokens = [], 0
    for i, result in enumerate(results):
        if not isinstance(result, dict) or "embedding" not in result:
            raise HTTPError(400, f"model {model.config.name} (handler {model.config.handler}) "
                            "does not return embeddings")
        tokens += int(result.get("tokens", 0))
        data.append({"object": "embedding", "index": i, "embedding": _encode(result["embedding"], encoding)})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model.config.name, "usage": usage}


async def _run_all(model, payloads: list, what: str) -> list:
    """Every payload queued at once or none (503 before any is queued: one request never fills the queue); their
    results in order, the first failure raised as its HTTP error."""
    try:
        waits = model.submit_all(payloads)
    except (QueueFull, ModelUnavailable) as exc:
        raise _http_error(exc, model) from None
    results = await asyncio.gather(*(_answer(wait, model) for wait in waits), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise (result if isinstance(result, HTTPError)
                   else HTTPError(500, f"{what} failed: {result}", "server_error"))
    return results


def _json_request(body: bytes, example: str) -> dict:
    request = _decode_body(body, "application/json")
    if not isinstance(request, dict):
        raise HTTPError(400, f"body must be a JSON object like {example}")
    return request


def _named_model(server: ModelServer, request: dict):
    """The model the request names, or the only one served."""
    name = request.get("model")
    if not name and len(server.models) == 1:
        name = next(iter(server.models))
    return _model(server, str(name or ""))


async def _scores(model, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
    """Each (query, document) pair's relevance score through a reranker model, and the tokens they took."""
    results = await _run_all(model, [{"query": q, "document": d} for q, d in pairs], "scoring")
    if not all(isinstance(r, dict) and isinstance(r.get("score"), int | float) for r in results):
        raise HTTPError(400, f"model {model.config.name} (handler {model.config.handler}) does not score pairs; "
                        "serve a cross-encoder with the reranker handler (NAME=reranker:PATH)")
    return [float(r["score"]) for r in results], sum(int(r.get("tokens", 0)) for r in results)


def _texts(value: Any, field: str, limit: int) -> list[str]:
    """A non-empty list of strings ({"text": ...} objects too, as Cohere's and Jina's clients send documents)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = [v["text"] if isinstance(v, dict) and isinstance(v.get("text"), str) else v for v in value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise HTTPError(400, f"'{field}' must be a non-empty string or list of strings")
    if len(value) > limit:
        raise HTTPError(413, f"'{field}' has {len(value)} items; send at most {limit} per request")
    return value


async def _rerank(server: ModelServer, body: bytes) -> dict:
    request = _json_request(body, '{"model": "rerank", "query": "...", "documents": ["...", ...]}')
    query = request.get("query")
    if not isinstance(query, str):
        raise HTTPError(400, "'query' must be a string")
    documents = _texts(request.get("documents"), "documents", MAX_RERANK_DOCUMENTS)
    top_n = request.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise HTTPError(400, f"'top_n' must be a positive integer, got {top_n!r}")
    model = _named_model(server, request)
    scores, tokens = await _scores(model, [(query, d) for d in documents])
    ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
    keep = request.get("return_documents", True) is not False
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": documents[i]}} if keep else {})}
               for i in ranked]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model.config.name, "results": results,
            "usage": {"total_tokens": tokens}}


async def _score(server: ModelServer, body: bytes) -> dict:
    """vLLM's /v1/score: text_1 against each of text_2 (one text_1), or pairwise (as many of each)."""
    request = _json_request(body, '{"model": "rerank", "text_1": "...", "text_2": ["...", ...]}')
    first = _texts(request.get("text_1"), "text_1", MAX_RERANK_DOCUMENTS)
    second = _texts(request.get("text_2"), "text_2", MAX_RERANK_DOCUMENTS)
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise HTTPError(400, f"'text_1' has {len(first)} texts and 'text_2' {len(second)}: give one text_1, or as "
                        "many as text_2 (scored pairwise)")
    model = _named_model(server, request)
    scores, tokens = await _scores(model, list(zip(first, second)))
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "model": model.config.name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


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
