"""The model server's state: the registered models by name, and register / scale / unregister.

Shared by the inference routes, the management API and the `loom serve` component.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.handler import check_handler_spec
from loom.batching.metrics import BatchingMetrics
from loom.batching.model import ServedModel
from loom.batching.placement import DevicePlacer, device_list


class ModelExists(Exception):
    """A model of that name is already registered (409)."""


class ModelNotFound(Exception):
    """No model of that name (404)."""


class ModelServer:
    def __init__(self, registry: CollectorRegistry | None = None, devices: list[str] | None = None):
        """devices: where workers go, in turn over all models (default: every visible GPU, else the CPU)."""
        self.models: dict[str, ServedModel] = {}
        self.placer = DevicePlacer(device_list() if devices is None else devices)
        self._loading: set[str] = set()
        self.metrics = BatchingMetrics(registry, lambda: list(self.models.values())) if registry is not None else None

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none registered"
            raise ModelNotFound(f"model {name!r} is not registered (known: {known}); register it on the management API")
        return model

    async def register(self, config: ModelConfig) -> ServedModel:
        """Start the model's workers and wait for them to load; ModelExists if the name is taken."""
        if config.name in self.models or config.name in self._loading:
            raise ModelExists(f"model {config.name!r} is already registered; unregister it first or pick another name")
        check_handler_spec(config.handler)
        self._loading.add(config.name)
        try:
            model = await ServedModel.create(config, self.metrics, self.placer)
        finally:
            self._loading.discard(config.name)
        self.models[config.name] = model
        return model

    async def unregister(self, name: str) -> dict[str, Any]:
        """Stop routing to the model, answer everything it accepted, then stop its workers."""
        model = self.get(name)
        pending = model.in_flight_requests
        await model.stop(drain=True)
        self.models.pop(name, None)
        return {"model": name, "status": "unregistered", "drained_requests": pending}

    async def scale(self, name: str, workers: int) -> ServedModel:
        model = self.get(name)
        await model.scale(workers)
        return model

    async def stop(self) -> None:
        """Drain every model (SIGTERM path)."""
        await asyncio.gather(*(m.stop(drain=True) for m in self.models.values()), return_exceptions=True)
        self.models.clear()

    def is_ready(self) -> bool:
        return all(m.slots for m in self.models.values()) and not self._loading

    def summary(self) -> list[dict[str, Any]]:
        return [{"name": name, "handler": m.config.handler, "workers": len(m.slots), "batch_size": m.config.batch_size,
                 "max_batch_delay": m.config.max_batch_delay, "queue_depth": len(m.queue)}
                for name, m in sorted(self.models.items())]
