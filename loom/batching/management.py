"""The management API (its own port, 127.0.0.1:8081 by default), every route behind a bearer token.

    POST   /models                 {"name", "handler", "path", "batch_size", "max_batch_delay", "workers", ...}
    POST   /models?url=net.mar     TorchServe's registration: &model_name, &batch_size, &max_batch_delay,
                                   &initial_workers, &response_timeout (s); the archive's own handler runs it
    GET    /models                 list
    GET    /models/{name}          describe: workers (pid, busy, CPU), batch settings, queue depth
    PUT    /models/{name}          {"workers": N} and/or {"batch_size": B, "max_batch_delay": ms}; also ?min_worker=N
    DELETE /models/{name}          drain, then stop the workers

Send ``Authorization: Bearer <token>``; `loom serve` prints the token and writes it to a file (0600).

Registering a model runs code (a handler file or module) in worker processes, so ``POST /models`` is off unless
the server was started with ``--enable-model-api`` (TorchServe's answer to ShellTorch, CVE-2023-43654); without it
the API lists, describes, scales and unregisters, and registration answers 403 naming the flag. With
``--model-store DIR``, handler files and model folders must lie inside DIR.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from loom.batching.config import ModelConfig
from loom.batching.handler import BUILTIN_HANDLERS
from loom.batching.handlers.torchserve import archive_model_name
from loom.batching.handlers.torchserve import archive_settings as torchserve_archive_settings
from loom.batching.routes import HTTPError, error_response, json_response
from loom.batching.server import ModelExists, ModelNotFound, ModelServer
from loom.batching.worker import WorkerStartError
from loom.server.guard import Guard, HTTPPolicy
from loom.server.paths import resolve_inside

MAX_MANAGEMENT_BODY_BYTES = 1 << 20

UPDATABLE = {"workers", "batch_size", "max_batch_delay"}


def new_token() -> str:
    return secrets.token_hex(24)  # hex: never starts with '-', so it can be passed as a flag value as it is


def write_token_file(path: Path, token: str) -> None:
    """Write the token readable by the owner only: never through a symlink, and 0600 even if the file existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only when the file is created
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"management": token}) + "\n")


def build_management_app(server: ModelServer, token: str, enable_model_api: bool = False,
                         model_store: str | Path | None = None) -> Guard:
    """The management app behind its own ``Guard`` (the token, a 1 MiB body bound, JSON bodies only)."""
    if not token:
        raise ValueError("the management API needs a non-empty token; pass --management-token or let loom generate one")
    store = Path(model_store).expanduser().resolve() if model_store else None
    app = FastAPI(title="Loom model management", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/models")
    async def register(request: Request) -> Response:
        if not enable_model_api:
            return error_response(HTTPError(403, "registering models runs their handler code and is off on this "
                                            "server; restart it with --enable-model-api to allow it",
                                            "permission_error"))
        try:
            query = dict(request.query_params)
            settings = archive_settings(query, store) if "url" in query else _json_object(await request.body())
            config = ModelConfig(**settings)
            check_in_store(config, store)
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
            model.config.updated(**changes)  # validates every bound before anything starts or stops
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

    policy = HTTPPolicy(api_key=token, max_body_bytes=MAX_MANAGEMENT_BODY_BYTES, public_paths=frozenset(),
                        key_name="management token (loom serve prints it and writes it to its token file)")
    return Guard(app, policy)


TORCHSERVE_QUERY = {"url", "model_name", "batch_size", "max_batch_delay", "initial_workers", "response_timeout",
                    "synchronous", "handler", "runtime"}


def archive_settings(query: dict[str, str], store: Path | None) -> dict[str, Any]:
    """TorchServe's ``POST /models?url=...`` as Loom's settings: the archive (a file name in the model store, or a
    path) served by the ``torchserve`` handler. URLs to download are refused: put the archive in the store."""
    unknown = sorted(set(query) - TORCHSERVE_QUERY)
    if unknown:
        raise HTTPError(400, f"unknown registration parameter(s) {', '.join(unknown)}; TorchServe's are "
                             f"{', '.join(sorted(TORCHSERVE_QUERY))}")
    url = query["url"]
    if "://" in url:
        raise HTTPError(400, "Loom does not download model archives: copy the .mar into the model store and give "
                             "its file name as url")
    if query.get("handler") or query.get("runtime", "python").lower() not in ("python", "python3"):
        raise HTTPError(400, "the archive's own handler runs it: drop handler, and runtime other than python")
    path = store / url if store is not None and not Path(url).is_absolute() else Path(url).expanduser()
    inside = store is None or resolve_inside(store, str(path)) is not None  # read nothing outside the store
    name = query.get("model_name") or (archive_model_name(path) if inside else None) or path.name.removesuffix(".mar")
    settings: dict[str, Any] = {"name": name, "handler": "torchserve", "path": str(path)}
    if inside:  # the archive's model-config.yaml, then the query's parameters over it (TorchServe's order)
        try:
            settings.update(torchserve_archive_settings(path))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
    for key, field, kind, scale in (("batch_size", "batch_size", int, 1),
                                    ("max_batch_delay", "max_batch_delay", float, 1),
                                    ("initial_workers", "workers", int, 1),
                                    ("response_timeout", "request_timeout", float, 1000)):  # TorchServe: seconds
        if key in query:
            settings[field] = _query_number(key, query[key], kind) * scale
    return settings


def check_in_store(config: ModelConfig, store: Path | None) -> None:
    """With a model store, a handler file and a model folder must lie inside it (no ``..``, no symlink out)."""
    if store is None:
        return
    target = BUILTIN_HANDLERS.get(config.handler, config.handler).partition("#")[0]
    paths = [("handler", target)] if target.endswith(".py") else []
    if config.path is not None:
        paths.append(("path", config.path))
    for field, value in paths:
        if resolve_inside(store, value) is None:
            raise ValueError(f"{field} {value!r} is outside the model store; put it in the --model-store folder")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise HTTPError(400, f"body is not valid JSON ({exc})") from None
    except RecursionError:
        raise HTTPError(400, "body JSON nests too deeply; flatten it") from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'body must be a JSON object, e.g. {"name": "minilm", "handler": "embedding"}')
    return value


def _query_number(key: str, value: str, kind: type) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise HTTPError(400, f"query parameter {key} must be a number, got {value!r}") from None


def _update_changes(request: Request, body: bytes) -> dict[str, Any]:
    changes = _json_object(body)
    query = dict(request.query_params)
    if "min_worker" in query:  # TorchServe's spelling
        query["workers"] = query.pop("min_worker")
    for key, value in query.items():
        changes[key] = _query_number(key, value, float if key == "max_batch_delay" else int)
    unknown = set(changes) - UPDATABLE
    if unknown or not changes:
        raise HTTPError(400, f"PUT accepts {sorted(UPDATABLE)}; got {sorted(changes) or 'nothing'}")
    return changes
