"""The handler API: the hooks a model author writes; the server owns queues, batching, processes and HTTP.

Per worker process, once: ``setup(ctx)``. Per batch: ``decode(item)`` for each request (a bad input raises
:class:`ItemError` and fails only its own request), then ``preprocess(list) -> batch``, ``inference(batch) ->
outputs``, ``postprocess(outputs) -> list`` with one result per request. A result that is an exception fails only
its request; if a batch hook raises, the batch is split in halves and retried so that one bad input never fails
its neighbours.

    class Doubler(Handler):
        def inference(self, batch):       # batch: list of decoded requests
            return [2 * x for x in batch]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_HANDLERS = {
    "embedding": "loom.batching.handlers.embedding#EmbeddingHandler",
    "image-classifier": "loom.batching.handlers.image_classifier#ImageClassifierHandler",
    "reranker": "loom.batching.handlers.reranker#RerankerHandler",
    "torchserve": "loom.batching.handlers.torchserve#TorchServeHandler",
}


WHOLE_REQUEST_HANDLERS = ("torchserve",)
"""Built-in handlers whose items are whole requests (``RequestData``: headers and form fields beside the body), as
TorchServe's handlers read them; every other handler gets the decoded body alone."""


@dataclass(frozen=True, slots=True)
class RequestData:
    """One POST /predictions request as a whole-request handler gets it (picklable: it travels to the workers)."""

    body: Any
    """The body decoded by its content type (JSON parsed, text as str, else bytes); None for a form's."""
    headers: dict[str, str]
    """The request's headers, names in lower case."""
    form: dict[str, Any] | None = None
    """A multipart/form-data body's fields by name (each part decoded by its own content type; a part without one
    stays bytes, as TorchServe passes it); None: not a form."""
    form_types: dict[str, str] = field(default_factory=dict)
    """Each form field's content type ("" where the part has none)."""


class ItemError(Exception):
    """One request's failure, with the HTTP status its caller gets (400: bad input by default)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Context:
    """What ``setup`` learns about where it runs."""

    model_name: str
    model_dir: str | None
    worker_index: int
    num_threads: int
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """Where to put the model: "cpu", or this worker's GPU ("cuda:1") from the server's round-robin (--gpus)."""
    batch_size: int = 1
    """The most requests one batch holds (the model's batch_size)."""


class Handler:
    """Subclass and override the hooks you need; every default passes its input through."""

    def setup(self, ctx: Context) -> None:
        """Load the model (once per worker process)."""

    def decode(self, item: Any) -> Any:
        """Check and convert one request's body; raise ItemError for bad input."""
        return item

    def preprocess(self, items: list[Any]) -> Any:
        """Decoded requests → one batch (a padded tensor, say)."""
        return items

    def inference(self, batch: Any) -> Any:
        """Run the model on the whole batch."""
        return batch

    def postprocess(self, outputs: Any) -> list[Any]:
        """Model outputs → one JSON-able result (or exception) per request, in order."""
        return list(outputs)


@dataclass(slots=True, frozen=True)
class Raw:
    """A result sent back as it is, not as JSON: ``body`` with its ``content_type`` (an image, text)."""

    body: bytes
    content_type: str

    def __post_init__(self) -> None:
        if not self.content_type.isprintable() or not self.content_type.isascii() or "\n" in self.content_type:
            raise ValueError(f"content type {self.content_type!r} is not a header value")


@dataclass(slots=True)
class ItemResult:
    """What travels back from a worker for one request: a value, or an error with its HTTP status."""

    value: Any = None
    error: str | None = None
    status: int = 200


def run_batch(handler: Handler, items: list[Any]) -> list[ItemResult]:
    """Run the hooks on a batch; every request gets its own result or its own error."""
    results: list[ItemResult | None] = [None] * len(items)
    good: list[int] = []
    decoded: list[Any] = []
    for i, item in enumerate(items):
        try:
            decoded.append(handler.decode(item))
            good.append(i)
        except Exception as exc:  # noqa: BLE001 - any decode failure is this item's own
            results[i] = _error_result(exc)
    for i, result in zip(good, _run_decoded(handler, decoded)):
        results[i] = result
    return results  # type: ignore[return-value]


def _run_decoded(handler: Handler, decoded: list[Any]) -> list[ItemResult]:
    if not decoded:
        return []
    try:
        outputs = handler.postprocess(handler.inference(handler.preprocess(decoded)))
        if len(outputs) != len(decoded):
            raise RuntimeError(f"postprocess returned {len(outputs)} results for {len(decoded)} requests")
    except Exception as exc:  # noqa: BLE001
        if len(decoded) == 1:
            return [_error_result(exc)]
        # NOTE: split and retry so that only the failing request(s) fail; costs log2(B) extra calls per bad item.
        half = len(decoded) // 2
        return _run_decoded(handler, decoded[:half]) + _run_decoded(handler, decoded[half:])
    return [_error_result(o) if isinstance(o, BaseException) else ItemResult(value=o) for o in outputs]


def _error_result(exc: BaseException) -> ItemResult:
    if isinstance(exc, ItemError):
        return ItemResult(error=str(exc), status=exc.status)
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return ItemResult(error=f"handler failed: {detail}", status=500)


def load_handler_class(spec: str) -> type[Handler]:
    """A built-in name, ``path/to/file.py[#Class]`` or ``package.module[#Class]`` → the Handler subclass."""
    target, _, class_name = BUILTIN_HANDLERS.get(spec, spec).partition("#")
    module = _load_module(target)
    if class_name:
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Handler)):
            raise ValueError(f"{target} has no Handler subclass named {class_name!r}")
        return cls
    found = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, Handler) and c is not Handler
             and c.__module__ == module.__name__]
    if len(found) != 1:
        names = ", ".join(c.__name__ for c in found) or "none"
        raise ValueError(f"{target} must define exactly one Handler subclass (found {names}); "
                         f"pick one with {target}#ClassName")
    return found[0]


def _load_module(target: str):
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"handler file {path} not found; "
                             f"pass an existing .py file or a built-in name {sorted(BUILTIN_HANDLERS)}")
        name = f"loom_handler_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ValueError(
            f"handler {target!r} is neither a built-in ({', '.join(sorted(BUILTIN_HANDLERS))}), a .py file, "
            f"nor an importable module: {exc}"
        ) from exc


def check_handler_spec(spec: str) -> None:
    """Fail fast in the server process (without importing user code) when a handler cannot be found."""
    target = BUILTIN_HANDLERS.get(spec, spec).partition("#")[0]
    if target.endswith(".py"):
        if not Path(target).expanduser().is_file():
            raise ValueError(f"handler file {target} not found; "
                             f"pass an existing .py file or one of {sorted(BUILTIN_HANDLERS)}")
        return
    try:
        found = importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(
            f"handler {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_HANDLERS))}), a .py file, "
            "nor an importable module path"
        )
