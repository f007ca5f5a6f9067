"""The server's LoRA adapters by name: the ``--lora-modules`` given at start, and those loaded at run time.

    loom serve --model smollm2 --enable-lora --lora-modules sql=out/adapter chat=/adapters/chat --max-loras 2
    curl 127.0.0.1:8000/v1/completions -d '{"model": "sql", "prompt": "..."}'     # the adapter named in "model"

Runtime loading (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, vLLM's routes) reads folders from the
server's disk, so it is off unless ``--allow-runtime-lora-updating`` is given; with ``--lora-store DIR`` a path must
resolve inside DIR (relative paths are taken from there). The routes sit behind the API key like every other route.
Each adapter gets a fresh id when it is registered, so an adapter unloaded and loaded again under the same name never
shares prefix-cache blocks with its former self.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from pydantic import BaseModel, Field

from loom.engine.lora import LoRARequest
from loom.server.paths import resolve_inside

MAX_ADAPTERS = 1024
"""Names one server keeps at most (each costs host memory once read)."""


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None
    """Accepted as vLLM does; the name alone identifies the adapter here."""


def parse_lora_module(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` (vLLM's ``--lora-modules`` form) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--lora-modules takes NAME=PATH entries, got {spec!r}")
    return name.strip(), path.strip()


class LoRARegistry:
    def __init__(self, base_names: list[str], store: str | None = None):
        self.base_names = list(base_names)
        self.store = Path(store).resolve() if store else None
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def items(self) -> list[tuple[str, LoRARequest]]:
        return list(self._by_name.items())

    def new_request(self, name: str, path: str, confine: bool) -> LoRARequest:
        """A request for a new adapter name (not registered yet: call ``add`` once its weights are read)."""
        if not name or len(name) > 256:
            raise ValueError("lora_name must be 1 to 256 characters")
        if name in self.base_names or name in self._by_name:
            raise ValueError(f"the name {name!r} is already served; unload it first or pick another name")
        if len(self._by_name) >= MAX_ADAPTERS:
            raise ValueError(f"this server already holds {MAX_ADAPTERS} adapters; unload some first")
        return LoRARequest(name, next(self._ids), self._resolve(path) if confine else path)

    def add(self, request: LoRARequest) -> None:
        with self._lock:
            if request.lora_name in self._by_name:
                raise ValueError(f"the name {request.lora_name!r} is already served")
            self._by_name[request.lora_name] = request

    def remove(self, name: str) -> LoRARequest | None:
        with self._lock:
            return self._by_name.pop(name, None)

    def _resolve(self, path: str) -> str:
        if self.store is None:
            return path
        target = resolve_inside(self.store, path)
        if target is None:
            raise ValueError("lora_path must name a folder inside the server's --lora-store")
        return str(target)
