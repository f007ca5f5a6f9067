"""The one FastAPI app of `loom serve`: components' routes, /health, /metrics, /version, behind one ``Guard``.

Errors no route handled itself still leave as JSON: a body that is not JSON (or nests too deeply) is 400, other
request-validation errors are FastAPI's 422, HTTP errors keep their status, and an unexpected exception is a 500
whose body names no exception text or server path (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from loom import __version__
from loom.server.component import Component
from loom.server.guard import GUARD_RESPONSES, Guard, HTTPPolicy, error_body

log = logging.getLogger("loom.server")


def build_app(components: list[Component], registry: CollectorRegistry, policy: HTTPPolicy | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for component in components:
            await component.start()
        try:
            yield
        finally:
            # Reverse order: the last started is the first drained.
            for component in reversed(components):
                await component.stop()

    policy = policy or HTTPPolicy()
    raw = tuple(p for c in components for p in getattr(c, "raw_body_prefixes", ()))
    if raw:
        policy.raw_body_prefixes = tuple(dict.fromkeys(policy.raw_body_prefixes + raw))
    app = FastAPI(title="Loom", version=__version__, lifespan=lifespan, responses=GUARD_RESPONSES)
    app.state.components = components
    app.state.registry = registry
    app.state.policy = policy
    for component in components:
        for router in component.routers():
            app.include_router(router)
    add_error_handlers(app)
    raw_routes = [route for c in components for route in getattr(c, "raw_routes", lambda: [])()]
    if raw_routes:
        app.add_middleware(RawRoutes, routes=raw_routes)
    app.add_middleware(Guard, policy=policy)  # added last: the outermost, so the raw routes are guarded too

    @app.get("/health")
    async def health() -> JSONResponse:
        parts = {c.name: c.health() for c in components}
        ready = all(p.get("ready", True) for p in parts.values())
        return JSONResponse({"status": "ok" if ready else "starting", "components": parts}, status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    return app


class RawRoutes:
    """Plain ASGI routes answered before FastAPI's router: a request whose method is in ``route.methods`` and whose
    path is ``route.prefix`` plus one segment goes to ``await route(scope, receive, send, segment)``; every other
    request goes on to the app. For hot paths where FastAPI's per-request work is a large share of the latency."""

    def __init__(self, app, routes):
        self.app = app
        self.routes = tuple(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for route in self.routes:
                if scope["method"] in route.methods and path.startswith(route.prefix):
                    segment = path[len(route.prefix):]
                    if segment and "/" not in segment:
                        await route(scope, receive, send, segment)
                        return
        await self.app(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            message = "the request body is not valid JSON; fix it and send it again"
            return JSONResponse({"detail": message, **error_body(message, "invalid_request_error", "invalid_json")},
                                status_code=400)
        return JSONResponse({"detail": _jsonable(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        message = "the request body nests too deeply; flatten it"
        return JSONResponse({"detail": message, **error_body(message, "invalid_request_error", "invalid_json")},
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        message = "internal server error; the server log has the details"
        return JSONResponse(error_body(message, "server_error"), status_code=500)


def _jsonable(errors: list[dict]) -> list[dict]:
    """Validation errors without their ``ctx`` objects (exceptions are not JSON) and with inputs cut short."""
    out = []
    for e in errors:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        out.append(item)
    return out
