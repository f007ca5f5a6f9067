"""`torchserve` handler: a TorchServe model archive (``.mar``, or the folder it unpacks to) served with its own handler
code, unchanged, behind Loom's batching, workers and routes.

    loom serve --serve mnist=torchserve:/models/mnist.mar --batch-size 8 --max-batch-delay 10
    curl -s localhost:8000/predictions/mnist -T 0.png

What TorchServe's Python backend gives a handler, this gives it too:

- **The archive.** ``MAR-INF/MANIFEST.json`` names the handler (``file.py``, ``file.py:function``, or a TorchServe
  built-in such as ``image_classifier``), the ``serializedFile`` and ``modelFile``. A ``.mar`` is unpacked once into
  ``$LOOM_HOME/mar/`` (no member outside the folder, no links, bounded size) and reused while unchanged.
- **The entry point,** by TorchServe's rules (``ts/model_loader.py``): ``file.py:fn`` is a function ``fn(data,
  context)``, called once with ``data=None`` to initialise; a module defining exactly one class gets an instance,
  ``initialize(context)``, then ``handle(data, context)`` per batch; otherwise the module's own ``handle``.
- **The context** (``ts.context.Context``'s surface): ``model_name``, ``manifest``, ``system_properties``
  (``model_dir``, ``gpu_id``, ``batch_size``, ...), ``model_yaml_config``, ``metrics`` (recorded, not exported),
  ``get_request_header`` / ``get_all_request_header`` (the request's HTTP headers, and each input's
  ``{"content-type": ...}``), ``set_response_content_type`` / ``set_response_status``.
- **The batch:** ``data`` is one dict per request: ``{"body": value}``, or a multipart/form-data body's fields by
  name (``curl -F data=@kitten.jpg`` gives ``{"data": ...}``), each value decoded as TorchServe decodes it (JSON
  parsed, text as ``str``, anything else ``bytes``; a form field without a content type stays ``bytes``);
  ``handle`` returns one result per request. A ``str`` result
  goes back as text, ``bytes`` as ``application/octet-stream`` (or the content type the handler set), anything else
  as JSON.

Handlers that import ``ts`` (``from ts.torch_handler.base_handler import BaseHandler``, the built-in handlers) need
TorchServe's Python package: ``pip install torchserve`` (it runs without TorchServe's Java frontend). A ``.mar`` is
code: it is served only when the operator names it (``--serve``, models.yaml, or a registration with
``--enable-model-api``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from loom.batching.handler import Context, Handler, ItemError, Raw, RequestData
from loom.models.catalogue import loom_home

log = logging.getLogger(__name__)
MANIFEST = "MAR-INF/MANIFEST.json"
TS_BUILTINS = ("base_handler", "image_classifier", "image_segmenter", "object_detector", "text_classifier",
               "dali_image_classifier", "vllm_handler", "trt_llm_handler")
"""TorchServe's own handler names (``ts.torch_handler.<name>``)."""
MAX_MEMBERS = 100_000
MAX_RATIO = 20
"""Unpacked size over archive size past which a .mar is refused (weights barely compress; a zip bomb does)."""


class Metric:
    """One custom metric (TorchServe's ``Metric``: ``add_or_update`` / ``update``); the last value is kept."""

    def __init__(self, name: str, value: Any = None):
        self.name, self.value = name, value

    def add_or_update(self, value: Any, dimension_values: list | None = None, request_id: str = "") -> None:
        self.value = value

    update = add_or_update


class Metrics:
    """``context.metrics`` (TorchServe's MetricsCache surface): every metric is kept in ``values`` (not exported)."""

    def __init__(self) -> None:
        self.values: dict[str, Metric] = {}

    def _add(self, name: str, value: Any = None, *args, **kwargs) -> None:
        self.values.setdefault(name, Metric(name)).add_or_update(value)

    add_time = add_counter = add_size = add_percent = add_error = add_metric = _add

    def add_metric_to_cache(self, metric_name: str, *args, **kwargs) -> Metric:
        return self.values.setdefault(metric_name, Metric(metric_name))

    def get_metric(self, metric_name: str, *args, **kwargs) -> Metric:
        return self.values.setdefault(metric_name, Metric(metric_name))


class RequestProcessor:
    """One request's headers as ``ts.context.RequestProcessor`` holds them: the HTTP headers, and each input's
    ``{name: {"content-type": ...}}`` (``body`` for a plain body, the field names of a form). Names are looked up as
    given, then in lower case (HTTP names are case-insensitive; Loom receives them in lower case)."""

    def __init__(self, request_header: dict | None = None):
        self._request_header = dict(request_header or {})

    def get_request_property(self, key: str):
        value = self._request_header.get(key)
        return value if value is not None else self._request_header.get(key.lower())

    def get_request_properties(self) -> dict:
        return dict(self._request_header)


class TorchServeContext:
    """The context a TorchServe handler is given (``ts.context.Context``'s attributes and methods)."""

    def __init__(self, model_name: str, model_dir: str, manifest: dict, batch_size: int, gpu_id: int | None):
        self.model_name = model_name
        self.manifest = manifest
        self.system_properties = {"model_dir": model_dir, "gpu_id": gpu_id, "batch_size": batch_size,
                                  "server_name": "Loom", "server_version": "0.12.0",
                                  "limit_max_image_pixels": True}
        self.model_yaml_config: dict = _model_yaml(model_dir, manifest)
        self.metrics = Metrics()
        self.request_ids: dict[int, str] = {}
        self.request_processor: list[RequestProcessor] = []
        self.stopping_criteria = None
        self.headers: dict[int, dict[str, str]] = {}
        """Per request index: the response headers the handler set for this batch (content-type among them)."""
        self.status: dict[int, tuple[int, str]] = {}

    def start_batch(self, request_headers: list[dict]) -> None:
        self.headers, self.status = {}, {}
        self.request_ids = {i: f"{i}" for i in range(len(request_headers))}
        self.request_processor = [RequestProcessor(h) for h in request_headers]

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict:
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.headers.get(idx, {}).get("content-type")

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.headers.setdefault(idx, {})[key.lower()] = value

    def get_response_headers(self, idx: int) -> dict:
        return dict(self.headers.get(idx, {}))

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = (int(code), str(phrase))

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for idx in range(len(self.request_ids) or 1):
            self.set_response_status(code, phrase, idx)

    def get_response_status(self, idx: int) -> tuple[int, str]:
        return self.status.get(idx, (200, ""))


class TorchServeHandler(Handler):
    def setup(self, ctx: Context) -> None:
        if not ctx.model_dir:
            raise ValueError("the torchserve handler needs a model archive: NAME=torchserve:/path/model.mar (or the "
                             "folder a .mar unpacks to)")
        source = Path(ctx.model_dir).expanduser().resolve()
        folder = unpack(source) if source.is_file() else source
        manifest = read_manifest(folder)
        gpu = int(ctx.device.split(":")[1]) if ctx.device.startswith("cuda:") else None
        self.context = TorchServeContext(ctx.model_name, str(folder), manifest, ctx.batch_size, gpu)
        os.chdir(folder)  # as TorchServe starts its workers: handlers open their files by relative names
        self.max_rows = _archive_batch_size(self.context.model_yaml_config) or ctx.batch_size
        """The most requests one handle() call gets: the archive's own batchSize (model-config.yaml) if it gives
        one; a handler found to answer one result per call is given one request at a time."""
        self.entry = load_entry_point(folder, manifest["model"]["handler"], self.context)

    def inference(self, batch: list[Any]) -> list[Any]:
        results: list[Any] = []
        for start in range(0, len(batch), self.max_rows):
            results += self._handle(batch[start : start + self.max_rows])
        return results

    def _handle(self, rows: list[Any]) -> list[Any]:
        context = self.context
        data, headers = zip(*map(_ts_input, rows)) if rows else ((), ())
        context.start_batch(list(headers))
        started = time.perf_counter()
        outputs = self.entry(list(data), context)
        context.metrics.add_time("PredictionTime", (time.perf_counter() - started) * 1000, None, "ms")
        if isinstance(outputs, list) and len(outputs) == 1 and len(rows) > 1 and self.max_rows > 1:
            # a handler written for TorchServe's default batch of one (it reads data[0]): one request at a time
            log.warning("the TorchServe handler answered 1 result for %d requests: giving it one request per call "
                        "(set batchSize in the archive's model-config.yaml to batch it)", len(rows))
            self.max_rows = 1
            return self.inference(rows)
        if not isinstance(outputs, list) or len(outputs) != len(rows):
            got = f"{len(outputs)} results" if isinstance(outputs, list) else type(outputs).__name__
            raise RuntimeError(f"the TorchServe handler returned {got} for a batch of {len(rows)}; handle() must "
                               "return a list with one result per request")
        return [self._result(i, out) for i, out in enumerate(outputs)]

    def _result(self, idx: int, out: Any) -> Any:
        status, phrase = self.context.get_response_status(idx)
        if status >= 400:  # TorchServe sends the handler's answer with the status; here it is the error's message
            body = out.decode("utf-8", "replace") if isinstance(out, bytes | bytearray) else out
            message = body if isinstance(body, str) and body else phrase or f"the handler answered {status}"
            return ItemError(message, status)
        content_type = self.context.get_response_content_type(idx)
        if isinstance(out, bytes | bytearray):
            return Raw(bytes(out), content_type or "application/octet-stream")
        if isinstance(out, str):
            return Raw(out.encode(), content_type or "text/plain; charset=utf-8")
        return out


def _ts_input(row: Any) -> tuple[dict, dict]:
    """A request as TorchServe's backend hands it over: (its inputs by name: ``body``, or a form's fields; its
    headers: each input's ``{"content-type": ...}``, then the HTTP headers)."""
    if not isinstance(row, RequestData):  # a bare value (a handler called in-process)
        return {"body": row}, {}
    if row.form is None:
        inputs, types = {"body": row.body}, {"body": row.headers.get("content-type", "")}
    else:
        inputs, types = dict(row.form), row.form_types
    return inputs, {**{name: {"content-type": types.get(name, "")} for name in inputs}, **row.headers}


def load_entry_point(folder: Path, handler: str, context: TorchServeContext):
    """TorchServe's entry point rules (see the module docstring); initialises the handler."""
    module_name, _, function = handler.partition(":")
    module_name = Path(module_name).name.removesuffix(".py")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # as TorchServe: the handler imports the archive's other files
    try:  # the archive's own file first, then TorchServe's built-in of that name (ts/model_loader.py's order)
        module = importlib.import_module(module_name) if (folder / f"{module_name}.py").is_file() else None
        if module is None:
            if module_name not in TS_BUILTINS:
                raise ValueError(f"the archive's handler {handler!r} is neither a file in it nor a TorchServe "
                                 f"built-in ({', '.join(TS_BUILTINS)})")
            module = importlib.import_module(f"ts.torch_handler.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "ts":
            raise ValueError(f"the handler imports TorchServe's package ({exc.name}): pip install torchserve (its "
                             "Python part runs without Java)") from exc
        raise
    name = function or "handle"
    if hasattr(module, name):  # a function entry point, initialised with data=None
        entry = getattr(module, name)
        if not callable(entry):
            raise ValueError(f"the handler module {module_name}'s {name} is not a function")
        entry(None, context)
        return entry
    if function:
        raise ValueError(f"the handler module {module_name} has no function {function!r}")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ValueError(f"the handler module {module_name} has no handle() and {len(classes)} classes; TorchServe "
                         "takes one class with handle(), or a function entry point (file.py:function)")
    instance = classes[0]()
    if not callable(getattr(instance, "handle", None)):
        raise ValueError(f"the handler class {classes[0].__name__} has no handle(data, context) method")
    initialize = getattr(instance, "initialize", None)
    if callable(initialize):
        initialize(context)
    return instance.handle


def _model_yaml(model_dir: str, manifest: dict) -> dict:
    """The archive's model-config.yaml (``manifest.model.configFile``), as TorchServe hands it to the handler."""
    name = manifest.get("model", {}).get("configFile")
    if not name:
        return {}
    try:
        text = (Path(model_dir) / name).read_text()
    except OSError as exc:
        raise ValueError(f"the archive's configFile {name} cannot be read: {exc}") from None
    return _parse_yaml(text, f"the archive's configFile {name} cannot be read")


def _parse_yaml(text: str, error: str) -> dict:
    """A model-config.yaml's mapping ({} for anything else); a ValueError saying ``error`` when it is not YAML."""
    import yaml  # local: only archives with a config file need it

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{error}: {exc}") from None
    return value if isinstance(value, dict) else {}


def read_archive(path: str | Path) -> tuple[dict, str | None, str]:
    """(manifest, configFile name or None, its text) of a ``.mar``, read without unpacking it, or of the folder one
    unpacks to; OSError, KeyError, ValueError or zipfile.BadZipFile when they cannot be read."""
    path = Path(path).expanduser()
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(MANIFEST))
            name = manifest.get("model", {}).get("configFile")
            return manifest, name, zf.read(name).decode() if name else ""
    manifest = read_manifest(path)
    name = manifest.get("model", {}).get("configFile")
    return manifest, name, (path / name).read_text() if name else ""


YAML_SETTINGS = {"batchSize": ("batch_size", int, 1), "maxBatchDelay": ("max_batch_delay", float, 1),
                 "minWorkers": ("workers", int, 1), "responseTimeout": ("request_timeout", float, 1000)}
"""model-config.yaml keys Loom reads as the model's settings: (``ModelConfig`` field, kind, scale); responseTimeout
is in seconds, Loom's request_timeout in milliseconds."""


def archive_settings(path: str | Path) -> dict[str, Any]:
    """The model settings an archive's model-config.yaml gives (``YAML_SETTINGS``), read from the ``.mar`` without
    unpacking it (or from its folder); {} without a config file. A value that is not a number is a ValueError."""
    try:
        _, name, text = read_archive(path)
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return {}  # what is wrong with the archive is told when it loads
    if not text:
        return {}
    path = Path(path).expanduser()
    config = _parse_yaml(text, f"{path}: its {name} is not YAML")
    settings = {}
    for key, (field, kind, scale) in YAML_SETTINGS.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int if kind is int else int | float) or isinstance(value, bool):
            raise ValueError(f"{path}: {key} in its {name} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}")
        settings[field] = kind(value * scale)
    return settings


def archive_model_name(path: str | Path) -> str | None:
    """The ``modelName`` a ``.mar``'s manifest gives (TorchServe's default name), or None."""
    if not Path(path).expanduser().is_file():
        return None
    try:
        name = read_archive(path)[0]["model"]["modelName"]
    except (OSError, KeyError, TypeError, ValueError, AttributeError, zipfile.BadZipFile):
        return None
    return name if isinstance(name, str) else None


def _archive_batch_size(config: dict) -> int | None:
    value = config.get("batchSize")
    return int(value) if isinstance(value, int) and value >= 1 else None


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        manifest["model"]["handler"]  # noqa: B018 - must be there
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{folder} is not a TorchServe model: {MANIFEST} with model.handler is missing or "
                         "unreadable (make one with torch-model-archiver)") from None
    return manifest


def unpack(archive: Path) -> Path:
    """The folder ``archive`` unpacks to under ``$LOOM_HOME/mar/`` (unpacked once; reused while the file is the
    same): no member may leave the folder or be a link, and the whole may not be many times the archive's size."""
    with archive.open("rb") as f:  # hashed and unpacked through one handle: a file replaced meanwhile is not mixed in
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        target = loom_home() / "mar" / f"{archive.stem}-{digest.hexdigest()[:16]}"
        if (target / MANIFEST).is_file():
            return target
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                members = zf.infolist()
                _check_members(members, archive)
                if MANIFEST not in {m.filename for m in members}:
                    raise ValueError(f"{archive} is not a TorchServe model: it has no {MANIFEST} (make it with "
                                     "torch-model-archiver)")
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
                try:
                    for member in members:
                        zf.extract(member, staging)
                    os.replace(staging, target)  # workers unpacking at once: one wins, the others reuse it
                except OSError:
                    if not (target / MANIFEST).is_file():
                        raise
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except zipfile.BadZipFile:
            raise ValueError(f"{archive} is not a model archive (.mar files are zip files)") from None
    return target


def _check_members(members: list[zipfile.ZipInfo], archive: Path) -> None:
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"{archive} has {len(members)} files, more than {MAX_MEMBERS}")
    total = sum(m.file_size for m in members)
    if total > MAX_RATIO * max(archive.stat().st_size, 1) + (64 << 20):
        raise ValueError(f"{archive} unpacks to {total} bytes, {MAX_RATIO}x more than its size: refused")
    for m in members:
        parts = Path(m.filename).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise ValueError(f"{archive}: member {m.filename!r} would land outside the model folder")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise ValueError(f"{archive}: member {m.filename!r} is a link")
