"""The one FastAPI app of `loom serve`: components' routes, /health, /metrics, /version."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from loom import __version__
from loom.server.component import Component


def build_app(components: list[Component], registry: CollectorRegistry) -> FastAPI:
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

    app = FastAPI(title="Loom", version=__version__, lifespan=lifespan)
    app.state.components = components
    app.state.registry = registry
    for component in components:
        for router in component.routers():
            app.include_router(router)

    @app.get("/health")
    async def health() -> JSONResponse:
        parts = {c.name: c.health() for c in components}
        ready = all(p.get("ready", True) for p in parts.values())
        return JSONResponse({"status": "ok" if ready else "starting", "components": parts}, status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    return app
