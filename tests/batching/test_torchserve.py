"""TorchServe model archives (.mar) served by Loom with their own handler code: a BaseHandler-shaped class (eager
model file + state dict, as torch-model-archiver packs it) batched by Loom's batcher and equal to the model run by
hand; a function entry point whose text and bytes results go back as TorchServe sends them; per-request statuses
set through the context; and archives that must not unpack (paths out, links, zip bombs, no manifest)."""

from __future__ import annotations

import asyncio
import json
import stat
import textwrap
import zipfile

import pytest
import torch

from loom.batching.config import ModelConfig, parse_serve_spec
from loom.batching.handlers.torchserve import MANIFEST, unpack
from tests.batching.test_server_inprocess import run, serving

MODEL_PY = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)
"""

# The shape of a TorchServe BaseHandler subclass (initialize / preprocess / inference / postprocess / handle), without
# importing ts: the model class from the archive's model file, its weights from the serialized file.
CLASS_HANDLER = """
import importlib
import os

import torch


class NetHandler:
    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties["model_dir"]
        model_file = context.manifest["model"]["modelFile"].removesuffix(".py")
        self.model = importlib.import_module(model_file).Net()
        weights = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()
        self.batch_size = properties["batch_size"]
        self.initialized = True

    def preprocess(self, data):
        rows = []
        for idx, row in enumerate(data):
            body = row.get("data") or row.get("body")
            if not isinstance(body, dict) or len(body.get("x", [])) != 4:
                self.context.set_response_status(400, "send {'x': [4 numbers]}", idx)
                body = {"x": [0.0] * 4}
            rows.append(body["x"])
        return torch.tensor(rows, dtype=torch.float32)

    def inference(self, batch):
        with torch.no_grad():
            return self.model(batch)

    def postprocess(self, output):
        return [{"probs": row, "batch": len(output), "max_batch": self.batch_size} for row in output.tolist()]

    def handle(self, data, context):
        self.context = context
        out = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", 1.0, None, "ms")
        return out
"""

FUNCTION_HANDLER = """
STATE = {}


def handle_fn(data, context):
    if data is None:  # TorchServe initialises a function entry point with data=None
        STATE["ready"] = context.model_name
        return None
    out = []
    for idx, row in enumerate(data):
        body = row.get("body")
        if isinstance(body, bytes):
            context.set_response_content_type(idx, "image/x-reversed")
            out.append(body[::-1])
        else:
            out.append(f"{STATE['ready']}:{str(body).upper()}")
    return out
"""


def make_mar(path, handler: str, files: dict[str, bytes | str], extra: dict | None = None):
    """An archive as torch-model-archiver writes one: the files at the top, MAR-INF/MANIFEST.json beside them."""
    manifest = {"createdOn": "07/12/2026 10:00:00", "runtime": "python", "archiverVersion": "0.12.0",
                "model": {"modelName": path.stem, "handler": handler, "modelVersion": "1.0", **(extra or {})}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        for name, content in files.items():
            zf.writestr(name, content)
    return path


@pytest.fixture
def loom_home(tmp_path, monkeypatch):
    home = tmp_path / "loom-home"
    monkeypatch.setenv("LOOM_HOME", str(home))  # the workers inherit it: archives unpack under the test's folder
    return home


@pytest.fixture
def net_mar(tmp_path):
    torch.manual_seed(0)
    namespace: dict = {}
    exec(MODEL_PY, namespace)  # noqa: S102 - the test's own model file
    net = namespace["Net"]().eval()
    weights = tmp_path / "net.pt"
    torch.save(net.state_dict(), weights)
    mar = make_mar(tmp_path / "net.mar", "net_handler.py",
                   {"net_handler.py": textwrap.dedent(CLASS_HANDLER), "model.py": MODEL_PY,
                    "net.pt": weights.read_bytes()},
                   {"serializedFile": "net.pt", "modelFile": "model.py"})
    return mar, net


def test_a_class_handler_runs_batched_and_equals_the_model(loom_home, net_mar):
    mar, net = net_mar
    rows = torch.randn(8, 4).tolist()

    async def body():
        config = ModelConfig("net", "torchserve", str(mar), batch_size=8, max_batch_delay=500,
                             dispatch_when_idle=False)
        async with serving(config) as (client, _, _component):
            return await asyncio.gather(*(client.post("/predictions/net", json={"x": r}) for r in rows))

    responses = run(body())
    assert [r.status_code for r in responses] == [200] * 8
    got = torch.tensor([r.json()["probs"] for r in responses])
    with torch.no_grad():
        want = net(torch.tensor(rows))
    torch.testing.assert_close(got, want)
    assert {r.json()["batch"] for r in responses} == {8}  # one handle() call took all eight
    assert {r.json()["max_batch"] for r in responses} == {8}  # system_properties["batch_size"]
    assert len(list((loom_home / "mar").iterdir())) == 1  # unpacked once, into LOOM_HOME


def test_a_status_the_handler_sets_fails_only_its_request(loom_home, net_mar):
    mar, _ = net_mar

    async def body():
        config = ModelConfig("net", "torchserve", str(mar), batch_size=4, max_batch_delay=500,
                             dispatch_when_idle=False)
        async with serving(config) as (client, _, _component):
            good = {"x": [1.0, 2.0, 3.0, 4.0]}
            return await asyncio.gather(*(client.post("/predictions/net", json=b)
                                          for b in (good, {"x": [1]}, good, "text")))

    a, bad, b, text = run(body())
    assert (a.status_code, b.status_code) == (200, 200)
    assert bad.status_code == 400 and "4 numbers" in bad.json()["error"]["message"]
    assert text.status_code == 400


def test_a_function_entry_point_answers_text_and_bytes(loom_home, tmp_path):
    mar = make_mar(tmp_path / "fn.mar", "fn_handler.py:handle_fn", {"fn_handler.py": FUNCTION_HANDLER})

    async def body():
        async with serving(parse_serve_spec(f"fn={mar}", batch_size=2)) as (client, _, _component):
            text = await client.post("/predictions/fn", content=b"hello", headers={"content-type": "text/plain"})
            raw = await client.post("/predictions/fn", content=b"\x00\x01\x02",
                                    headers={"content-type": "application/octet-stream"})
            return text, raw

    text, raw = run(body())
    assert (text.status_code, text.text) == (200, "fn:HELLO")  # initialised with data=None, then called
    assert text.headers["content-type"].startswith("text/plain")
    assert (raw.status_code, raw.content, raw.headers["content-type"]) == (200, b"\x02\x01\x00", "image/x-reversed")


def test_torchserve_registration_by_query(loom_home, net_mar, tmp_path):
    """TorchServe's ``POST /models?url=net.mar&batch_size=..&initial_workers=..`` against the model store."""
    import contextlib
    import shutil

    import httpx
    from prometheus_client import CollectorRegistry

    from loom.batching.serve import ModelServerComponent
    from loom.server.app import build_app
    from tests.batching.test_server_inprocess import AUTH, TOKEN

    mar, net = net_mar
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(mar, store / "net.mar")
    shutil.copy(mar, tmp_path / "outside.mar")  # exists, but not in the store

    async def body():
        registry = CollectorRegistry()
        component = ModelServerComponent([], registry, TOKEN, token_file=None, enable_model_api=True,
                                          model_store=str(store))
        app = build_app([component], registry)
        await component.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://loom", timeout=30))
                mgmt = await stack.enter_async_context(httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=component.management.app), base_url="http://mgmt",
                    timeout=60))
                registered = await mgmt.post("/models?url=net.mar&batch_size=4&max_batch_delay=20"
                                             "&initial_workers=1&response_timeout=5", headers=AUTH)
                answer = await client.post("/predictions/net", json={"x": [1.0, 2.0, 3.0, 4.0]})
                refused = [await mgmt.post(f"/models?url={url}", headers=AUTH)
                           for url in ("https://example.com/net.mar", "../outside.mar", "net.mar&handler=x.py",
                                       "net.mar&model_name=other&batch_size=lots")]
                return registered, answer, refused
        finally:
            await component.stop()

    registered, answer, refused = run(body())
    assert registered.status_code == 201, registered.text
    described = registered.json()
    assert (described["name"], described["batch_size"], described["max_batch_delay"]) == ("net", 4, 20.0)
    with torch.no_grad():
        want = net(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))[0].tolist()
    assert answer.json()["probs"] == pytest.approx(want)
    assert [r.status_code for r in refused] == [400] * 4
    assert "does not download" in refused[0].json()["error"]["message"]
    assert "outside the model store" in refused[1].json()["error"]["message"]


# TorchServe's habits a handler may rely on: a module-level handle() beside a class (handle wins), files opened by
# relative names (the worker runs in the model folder), the archive's model-config.yaml (model_yaml_config; its
# batchSize caps a call), custom metrics, request processors, a header set by name, a 4xx answer with a body.
QUIRKS_HANDLER = """
import json

import torch

LABELS = json.load(open("labels.json"))  # relative: TorchServe's worker runs in the model folder


class Helper(torch.nn.Module):  # a class beside handle(): TorchServe still calls handle()
    pass


def handle(data, context):
    if data is None:
        assert context.model_yaml_config["handler"]["greeting"] == "hi"
        return None
    metric = context.metrics.add_metric_to_cache("Seen", unit="count")
    out = []
    for idx, row in enumerate(data):
        metric.add_or_update(idx)
        assert context.request_processor[idx].get_request_property("x") is None
        context.set_response_header(idx, "Status", "kept")  # a header named like the status: just a header
        body = row["body"]
        if body == "bad":
            context.set_response_status(422, "unused phrase", idx)
            out.append("bad is not a label index")
        else:
            out.append({"label": LABELS[int(body)], "rows": len(data),
                        "greeting": context.model_yaml_config["handler"]["greeting"]})
    return out
"""

SINGLE_HANDLER = """
def handle(data, context):  # written for TorchServe's default batch of one
    if data is None:
        return None
    return [{"echo": data[0]["body"]}]
"""


def test_torchserve_habits(loom_home, tmp_path):
    config_yaml = "batchSize: 2\nhandler:\n  greeting: hi\n"
    mar = make_mar(tmp_path / "quirks.mar", "quirks.py",
                   {"quirks.py": QUIRKS_HANDLER, "labels.json": json.dumps(["cat", "dog", "ship"]),
                    "model-config.yaml": config_yaml}, {"configFile": "model-config.yaml"})
    single = make_mar(tmp_path / "single.mar", "single.py", {"single.py": SINGLE_HANDLER})

    async def body():
        configs = [ModelConfig("quirks", "torchserve", str(mar), batch_size=8, max_batch_delay=500,
                               dispatch_when_idle=False),
                   ModelConfig("single", "torchserve", str(single), batch_size=8, max_batch_delay=500,
                               dispatch_when_idle=False)]
        async with serving(*configs) as (client, _, _component):
            quirks = await asyncio.gather(*(client.post("/predictions/quirks", json=b) for b in (0, 1, "bad", 2)))
            singles = await asyncio.gather(*(client.post("/predictions/single", json=i) for i in range(4)))
            return quirks, singles

    quirks, singles = run(body())
    assert [r.status_code for r in quirks] == [200, 200, 422, 200]
    assert [r.json()["label"] for r in (quirks[0], quirks[1], quirks[3])] == ["cat", "dog", "ship"]
    assert {r.json()["rows"] for r in (quirks[0], quirks[1], quirks[3])} <= {1, 2}  # the archive's batchSize
    assert quirks[0].json()["greeting"] == "hi"
    assert quirks[2].json()["error"]["message"] == "bad is not a label index"  # the handler's answer, with its status
    assert [r.json() for r in singles] == [{"echo": i} for i in range(4)]  # one request per call, none lost


FORM_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for idx, row in enumerate(data):
        out.append({"inputs": {k: [type(v).__name__, v if isinstance(v, (str, dict, list)) else len(v)]
                               for k, v in row.items()},
                    "token": context.get_request_header(idx, "X-Token"),
                    "input_types": {k: context.get_request_header(idx, k) for k in row},
                    "user_agent": "user-agent" in context.get_all_request_header(idx)})
    return out
"""


def test_headers_and_form_fields_reach_the_handler(loom_home, tmp_path):
    """As TorchServe: a multipart/form-data body's fields by name (a file part bytes, a JSON part parsed, a text
    part str, a field without a content type bytes), a plain body under "body", and the request's headers through
    get_request_header (any case) beside each input's content type; a form with no fields or no boundary is a 400,
    one of more than 1000 parts a 413."""
    mar = make_mar(tmp_path / "form.mar", "form_handler.py", {"form_handler.py": FORM_HANDLER})
    png = bytes(range(256)) * 3

    async def body():
        async with serving(parse_serve_spec(f"form={mar}", batch_size=4)) as (client, _, _component):
            form = await client.post(
                "/predictions/form", headers={"X-Token": "abc"}, data={"note": "hello"},
                files={"data": ("kitten.png", png, "image/png"),
                       "meta": ("m.json", b'{"k": [1, 2]}', "application/json"),
                       "caption": ("c.txt", b"a cat", "text/plain")})
            plain = await client.post("/predictions/form", json={"x": 1}, headers={"x-token": "def"})
            empty = await client.post("/predictions/form", content=b"--nothing--",
                                      headers={"content-type": "multipart/form-data; boundary=zzz"})
            many = "".join(f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(1001))
            too_many = await client.post("/predictions/form", content=(many + "--b--\r\n").encode(),
                                         headers={"content-type": "multipart/form-data; boundary=b"})
            no_boundary = await client.post("/predictions/form", content=b"x",
                                            headers={"content-type": "multipart/form-data"})
            return form, plain, empty, too_many, no_boundary

    form, plain, empty, too_many, no_boundary = run(body())
    assert too_many.status_code == 413 and "more than 1000 parts" in too_many.json()["error"]["message"]
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]["message"]
    assert form.status_code == 200, form.text
    got = form.json()
    assert got["inputs"] == {"data": ["bytes", len(png)], "meta": ["dict", {"k": [1, 2]}], "caption": ["str", "a cat"],
                             "note": ["bytes", 5]}
    assert got["token"] == "abc" and got["user_agent"]
    assert got["input_types"] == {"data": {"content-type": "image/png"}, "meta": {"content-type": "application/json"},
                                  "caption": {"content-type": "text/plain"}, "note": {"content-type": ""}}
    assert plain.json() == {"inputs": {"body": ["dict", {"x": 1}]}, "token": "def",
                            "input_types": {"body": {"content-type": "application/json"}}, "user_agent": True}
    assert empty.status_code == 400 and "no named fields" in empty.json()["error"]["message"]


def test_archive_file_named_like_a_builtin_is_the_archives(loom_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # setup() moves into the model folder, as TorchServe's worker runs there
    from loom.batching.handler import Context
    from loom.batching.handlers.torchserve import TorchServeHandler

    own = "def handle(data, context):\n    return None if data is None else ['own' for _ in data]\n"
    mar = make_mar(tmp_path / "ic.mar", "image_classifier.py", {"image_classifier.py": own})
    handler = TorchServeHandler()
    handler.setup(Context("ic", str(mar), 0, 1))
    assert handler.inference([b"x", b"y"]) == [handler._result(0, "own"), handler._result(1, "own")]


def test_serve_spec_shorthand(tmp_path):
    mar = make_mar(tmp_path / "m.mar", "h.py", {"h.py": ""})
    config = parse_serve_spec(f"m={mar}")
    assert (config.handler, config.path) == ("torchserve", str(mar))


def test_unpacked_once_and_reused(loom_home, tmp_path):
    mar = make_mar(tmp_path / "m.mar", "h.py", {"h.py": "x = 1\n", "sub/data.txt": "d"})
    folder = unpack(mar)
    assert (folder / "h.py").read_text() == "x = 1\n" and (folder / "sub" / "data.txt").read_text() == "d"
    (folder / "h.py").write_text("changed")
    assert unpack(mar) == folder and (folder / "h.py").read_text() == "changed"  # not unpacked again
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left


def _zip_with(path, name: str, content: bytes = b"x", mode: int | None = None, manifest: bool = True):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if manifest:
            zf.writestr(MANIFEST, json.dumps({"model": {"handler": "h.py"}}))
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, content)
    return path


@pytest.mark.parametrize("name, content, mode, needle", [
    ("../evil.py", b"x", None, "outside the model folder"),
    ("/etc/evil.py", b"x", None, "outside the model folder"),
    ("link.py", b"/etc/passwd", stat.S_IFLNK | 0o777, "is a link"),
    ("zeros.bin", bytes(100 << 20), None, "more than its size"),  # 100 MiB of zeros: a ~100 KiB archive
])
def test_archives_that_must_not_unpack(loom_home, tmp_path, name, content, mode, needle):
    with pytest.raises(ValueError, match=needle):
        unpack(_zip_with(tmp_path / "bad.mar", name, content, mode))
    assert not (tmp_path / "evil.py").exists()
    assert not list((loom_home / "mar").glob("bad-*"))


def test_not_an_archive_and_no_manifest(loom_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from loom.batching.handler import Context
    from loom.batching.handlers.torchserve import TorchServeHandler

    junk = tmp_path / "junk.mar"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a model archive"):
        unpack(junk)
    bare = _zip_with(tmp_path / "bare.mar", "h.py", manifest=False)
    for _ in range(2):  # the same clear answer every time (nothing half-unpacked left behind)
        with pytest.raises(ValueError, match="MANIFEST.json"):
            TorchServeHandler().setup(Context("m", str(bare), 0, 1))
    needs_ts = make_mar(tmp_path / "ts.mar", "h.py",
                        {"h.py": "from ts.torch_handler.base_handler import BaseHandler\n"})
    with pytest.raises(ValueError, match="pip install torchserve"):
        TorchServeHandler().setup(Context("m", str(needs_ts), 0, 1))


def test_archive_model_config_sets_what_the_operator_leaves(tmp_path):
    """model-config.yaml's batchSize, maxBatchDelay, minWorkers and responseTimeout (seconds) become the model's
    settings where the flags (or the registration's query) leave them at their defaults, as TorchServe orders them;
    a value of the wrong kind is refused by name."""
    import argparse

    from loom.batching.handlers.torchserve import archive_settings
    from loom.batching.management import archive_settings as registration
    from loom.batching.serve import add_serve_arguments, configs_from_args

    config_yaml = "batchSize: 3\nmaxBatchDelay: 40\nminWorkers: 1\nresponseTimeout: 7\nhandler:\n  k: v\n"
    files = {"fn_handler.py": FUNCTION_HANDLER, "model-config.yaml": config_yaml}
    mar = make_mar(tmp_path / "cfg.mar", "fn_handler.py:handle_fn", files, {"configFile": "model-config.yaml"})
    want = {"batch_size": 3, "max_batch_delay": 40.0, "workers": 1, "request_timeout": 7000.0}
    assert archive_settings(mar) == want

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    (plain,) = configs_from_args(parser.parse_args(["--serve", f"cfg={mar}"]))
    assert (plain.batch_size, plain.max_batch_delay, plain.workers, plain.request_timeout) == (3, 40.0, 1, 7000.0)
    (given,) = configs_from_args(parser.parse_args(["--serve", f"cfg={mar}", "--batch-size", "5"]))
    assert (given.batch_size, given.max_batch_delay) == (5, 40.0)
    # given at the defaults' values: still the operator's
    (same,) = configs_from_args(parser.parse_args(["--serve", f"cfg={mar}", "--batch-size", "8", "--workers", "0"]))
    assert (same.batch_size, same.workers, same.max_batch_delay) == (8, 0, 40.0)
    models_yaml = tmp_path / "models.yaml"
    models_yaml.write_text(f"models:\n  cfg:\n    handler: torchserve\n    path: {mar}\n    max_batch_delay: 10\n")
    (entry,) = configs_from_args(parser.parse_args(["--config", str(models_yaml), "--workers", "0"]))
    assert (entry.batch_size, entry.max_batch_delay, entry.workers, entry.request_timeout) == (3, 10.0, 0, 7000.0)

    settings = registration({"url": "cfg.mar", "batch_size": "6"}, tmp_path)
    assert (settings["batch_size"], settings["max_batch_delay"], settings["request_timeout"]) == (6, 40.0, 7000.0)

    bad = make_mar(tmp_path / "bad.mar", "fn_handler.py:handle_fn",
                   {"fn_handler.py": FUNCTION_HANDLER, "model-config.yaml": "batchSize: 2.5\n"},
                   {"configFile": "model-config.yaml"})
    with pytest.raises(ValueError, match="batchSize in its model-config.yaml must be an integer"):
        archive_settings(bad)
    assert archive_settings(make_mar(tmp_path / "none.mar", "fn_handler.py:handle_fn",
                                     {"fn_handler.py": FUNCTION_HANDLER})) == {}
