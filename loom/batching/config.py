"""Per-model settings of the model server and the two ways to declare them: `--serve` specs and models.yaml.

``--serve NAME=HANDLER[:PATH]``: HANDLER is a built-in name (``embedding``, ``reranker``, ``image-classifier``,
``torchserve``), a ``.py`` file or a dotted module path (``file.py#Class`` / ``pkg.mod#Class`` picks one class when
the module defines several); PATH is the model folder handed to the handler's ``setup``. ``NAME=model.mar`` is short
for ``NAME=torchserve:model.mar`` (a TorchServe archive with its own handler).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BATCH_SIZE = 1024
MAX_QUEUE_SIZE = 65536
MAX_BATCH_DELAY_MS = 60_000.0


def max_workers() -> int:
    """Most worker processes per model: four per core (each holds a copy of the model)."""
    return 4 * (os.cpu_count() or 1)


@dataclass(slots=True)
class ModelConfig:
    name: str
    """URL name: POST /predictions/{name}."""
    handler: str
    """Built-in handler name, a .py file or a dotted module path (optionally '#ClassName')."""
    path: str | None = None
    """Model folder passed to the handler's setup (None: the handler's packaged default, if it has one)."""
    batch_size: int = 8
    """Most requests in one inference call."""
    max_batch_delay: float = 5.0
    """Milliseconds a batch may wait to fill, counted from the arrival of its oldest request."""
    workers: int = 1
    """Worker processes, each with its own copy of the model."""
    max_queue_size: int = 256
    """Requests waiting per model before new ones get 503."""
    request_timeout: float = 30_000.0
    """Milliseconds a request may wait in the queue before it gets 504."""
    threads_per_worker: int | None = None
    """torch threads per worker; None divides the machine's cores among the workers."""
    dispatch_when_idle: bool = True
    """A lone request on a model with nothing in flight runs at once instead of waiting for company."""
    options: dict[str, Any] = field(default_factory=dict)
    """Handler-specific settings (for example {"top_k": 3})."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if not self.handler:
            raise ValueError("handler is empty; use a built-in name (embedding, reranker, image-classifier), "
                             "a .py file or a module")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0 <= self.max_batch_delay <= MAX_BATCH_DELAY_MS:
            raise ValueError(f"max_batch_delay is in milliseconds and must be in 0..{MAX_BATCH_DELAY_MS:.0f}, "
                             f"got {self.max_batch_delay}")
        if not 0 <= self.workers <= max_workers():
            raise ValueError(f"workers must be in 0..{max_workers()} (4 per core), got {self.workers}")
        if not 1 <= self.max_queue_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_queue_size must be in 1..{MAX_QUEUE_SIZE}, got {self.max_queue_size}")
        if not 0 < self.request_timeout <= 3_600_000:
            raise ValueError("request_timeout is in milliseconds and must be in (0, 3600000], "
                             f"got {self.request_timeout}")
        if self.threads_per_worker is not None and not 1 <= self.threads_per_worker <= max_workers():
            raise ValueError(f"threads_per_worker must be in 1..{max_workers()} or None (auto), "
                             f"got {self.threads_per_worker}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a JSON object of handler settings, got {type(self.options).__name__}")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"model path {self.path} does not exist; pass an existing model folder")

    def threads(self, workers: int | None = None) -> int:
        """torch threads for each worker: explicit, or the cores but one shared evenly (at least one)."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        # NOTE: one core is left to the server process (HTTP, JSON, batching). OpenMP threads that spin at barriers
        # while another busy process holds "their" core slow a forward pass by 10-30x (measured here: MiniLM, one
        # sentence, 31 ms on 1 thread vs 1016 ms on 2 threads with two other busy processes on 2 cores).
        return max(1, ((os.cpu_count() or 1) - 1) // max(1, workers or self.workers))

    def updated(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (unknown fields raise ValueError)."""
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_serve_spec(spec: str, **defaults: Any) -> ModelConfig:
    """``NAME=HANDLER[:PATH]`` → ModelConfig (defaults fill batch settings and workers)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--serve {spec!r} must look like NAME=HANDLER[:PATH], "
                         "e.g. minilm=embedding or vit=image-classifier:/models/vit")
    handler, _, path = rest.partition(":")
    if handler.endswith(".mar") and not path:  # NAME=model.mar: TorchServe's archive, run by its own handler
        handler, path = "torchserve", handler
    return ModelConfig(name=name, handler=handler, path=path or None, **defaults)


def load_models_yaml(path: str | Path, archive_settings=None, **defaults: Any) -> list[ModelConfig]:
    """models.yaml: ``models: {NAME: {handler, path, batch_size, max_batch_delay, workers, ...}}``. An entry's own
    settings win over ``defaults`` (the flags given), which win over ``archive_settings(handler, path)`` (a TorchServe
    archive's model-config.yaml)."""
    import yaml  # local: `loom serve` imports this module to build its flags; only --config reads YAML

    data = yaml.safe_load(Path(path).read_text()) or {}
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path} must hold a mapping 'models:' of NAME: {{handler: ..., batch_size: ...}}")
    configs = []
    for name, settings in models.items():
        if not isinstance(settings, dict) or "handler" not in settings:
            raise ValueError(f"{path}: model {name!r} needs at least 'handler: NAME_OR_FILE'")
        unknown = set(settings) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: model {name!r} has unknown settings {sorted(unknown)}")
        own = archive_settings(settings["handler"], settings.get("path")) if archive_settings else {}
        configs.append(ModelConfig(name=str(name), **{**own, **defaults, **settings}))
    return configs
