"""The management API (its own port, 127.0.0.1:8081 by default), every route behind a bearer token.

    POST   /models                 {"name", "handler", "path", "batch_size", "max_batch_delay", "workers", ...}
    GET    /models                 list
    GET    /models/{name}          describe: workers (pid, busy, CPU), batch settings, queue depth
    PUT    /models/{name}          {"workers": N} and/or {"batch_size": B, "max_batch_delay": ms}; also ?min_worker=N
    DELETE /models/{name}          drain, then stop the workers

Send ``Authorization: Bearer <token>``; `loom serve` prints the token and writes it to a file (0600).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from loom.batching.config import ModelConfig
from loom.batching.routes import HTTPError, error_response, json_response
from loom.batching.server import ModelExists, ModelNotFound, ModelServer
from loom.batching.worker import WorkerStartError

UPDATABLE = {"workers", "batch_size", "max_batch_delay"}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def write_token_file(path: Path, token: str) -> None:
    """Write the token readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"management": token}) + "\n")


def build_management_app(server: ModelServer, token: str) -> FastAPI:
    if not token:
        raise ValueError("the management API needs a non-empty token; pass --management-token or let loom generate one")
    app = FastAPI(title="Loom model management", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            return error_response(HTTPError(401, "missing or wrong management token; send 'Authorization: Bearer "
                                            "<token>' with the token loom serve printed", "authentication_error"))
        return await call_next(request)

    @app.post("/models")
    async def register(request: Request) -> Response:
        try:
            config = ModelConfig(**_json_object(await request.body()))
            model = await server.register(config)
            return json_response(model.describe(), 201)
        except TypeError as exc:
            return error_response(HTTPError(400, f"bad model settings: {exc}; see GET /models/<name> for the fields"))
        except (ValueError, WorkerStartError) as exc:
            return error_response(HTTPError(400, str(exc)))
        except ModelExists as exc:
            return error_response(HTTPError(409, str(exc), "conflict_error"))
        except HTTPError as err:
            return error_response(err)

    @app.get("/models")
    async def list_models() -> Response:
        return json_response({"models": server.summary()})

    @app.get("/models/{name}")
    async def describe(name: str) -> Response:
        try:
            return json_response(server.get(name).describe())
        except ModelNotFound as exc:
            return error_response(HTTPError(404, str(exc), "not_found_error"))

    @app.put("/models/{name}")
    async def update(name: str, request: Request) -> Response:
        try:
            changes = _update_changes(request, await request.body())
            model = server.get(name)
            if "batch_size" in changes or "max_batch_delay" in changes:
                model.update_batching(changes.get("batch_size"), changes.get("max_batch_delay"))
            if "workers" in changes:
                await server.scale(name, int(changes["workers"]))
            return json_response(model.describe())
        except ModelNotFound as exc:
            return error_response(HTTPError(404, str(exc), "not_found_error"))
        except (ValueError, TypeError, WorkerStartError) as exc:
            return error_response(HTTPError(400, str(exc)))
        except HTTPError as err:
            return error_response(err)

    @app.delete("/models/{name}")
    async def unregister(name: str) -> Response:
        try:
            return json_response(await server.unregister(name))
        except ModelNotFound as exc:
            return error_response(HTTPError(404, str(exc), "not_found_error"))

    return app


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise HTTPError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'body must be a JSON object, e.g. {"name": "minilm", "handler": "embedding"}')
    return value


def _update_changes(request: Request, body: bytes) -> dict[str, Any]:
    changes = _json_object(body)
    query = dict(request.query_params)
    if "min_worker" in query:  # TorchServe's spelling
        query["workers"] = query.pop("min_worker")
    for key, value in query.items():
        changes[key] = float(value) if key == "max_batch_delay" else int(value)
    unknown = set(changes) - UPDATABLE
    if unknown or not changes:
        raise HTTPError(400, f"PUT accepts {sorted(UPDATABLE)}; got {sorted(changes) or 'nothing'}")
    return changes
