"""What a part of `loom serve` plugs into the one HTTP app: routes, a start and a drain.

The LLM engine, the dynamic-batching model server and the image generator are each a ``Component``. The app owns
one Prometheus registry that every component registers its metrics in, so ``GET /metrics`` shows them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter


@dataclass(slots=True)
class ExtraServer:
    """A second ASGI app on its own port (the model server's management API, say)."""

    app: Any
    """Any ASGI application (a FastAPI app, or one wrapped in a ``Guard``)."""
    host: str
    port: int


class Component(Protocol):
    name: str

    def routers(self) -> list[APIRouter]:
        """Routes mounted on the main app."""
        ...

    async def start(self) -> None:
        """Called once the event loop runs (load models, start worker loops)."""
        ...

    async def stop(self) -> None:
        """Drain in-flight work, then release everything (processes, KV blocks, files)."""
        ...

    def health(self) -> dict:
        """A JSON-able summary for GET /health; include "ready": bool."""
        ...

    def extra_servers(self) -> list[ExtraServer]:
        """Apps that `loom serve` runs on further ports; most components return []."""
        ...

    # Optional: ``raw_body_prefixes: tuple[str, ...]``, path prefixes whose request bodies may have any content type
    # (the app's Guard requires JSON bodies everywhere else).
    # Optional: ``raw_routes() -> list``, plain ASGI routes answered ahead of FastAPI's router (``RawRoutes`` in
    # loom.server.app: each has ``prefix``, ``methods`` and ``async __call__(scope, receive, send, segment)``).
