"""The servers `benchmarks/vs_peers.py` compares, each as a context manager that starts it, waits until it answers
and yields (prediction URL, session id), and stops it (every process of its session) on the way out.

Two modes, chosen per call:
- ``server``: every server runs the SAME model code, :data:`COMMON` (written to the work folder as
  ``minilm_common.py``): ``PaddedMiniLM``, HF ``AutoModel`` on a padded batch, mean pooling, L2 normalisation.
  Loom runs it through a handler file that wraps it; TorchServe, LitServe and Ray Serve through their own handler
  APIs. Only batching, queueing, HTTP and worker plumbing differ.
- ``product``: each server's best path out of the box. Loom: its built-in ``embedding`` handler (packed encoder,
  oneDNN pre-packed weights). The peers ship no embedding handler of their own, so they run
  ``SentenceTransformersMiniLM`` (``SentenceTransformer.encode`` on the same folder: the library the model is
  published for), with the settings their docs recommend for throughput (LitServe: ``fast_queue=True``).

Loom runs from this interpreter (the project's .venv); the peers run from ``peers_bin`` (a separate venv, so that
their pinned fastapi/starlette never change the project's). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from loom.batching.handlers.embedding import default_model_dir
from loom.bench.process import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
MODES = ("server", "product", "archive")
ARCHIVE_PEERS = ("loom", "torchserve")
"""archive mode: TorchServe's own .mar of the server-mode code, served by TorchServe and by Loom's torchserve
handler (needs the peers' ts package and torch-model-archiver)."""
PEERS = ("loom", "torchserve", "litserve", "rayserve")

COMMON = '''
"""Model code shared by every server in the benchmark (written by benchmarks/_peer_servers.py)."""
import json

import torch
from transformers import AutoModel, AutoTokenizer


def text_of(body):
    """A request body (bytes, JSON text or a parsed dict) -> its "text"."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    if isinstance(body, str):
        body = json.loads(body)
    return body["text"]


class PaddedMiniLM:
    """Server mode: HF AutoModel on a padded batch, mean pooling over the mask, L2 normalisation."""

    def __init__(self, model_dir, threads):
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()

    def embed(self, texts):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [B, T, D]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D]
            return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()


class SentenceTransformersMiniLM:
    """Product mode for the peers: sentence-transformers' own encode (the folder's pooling and Normalize)."""

    def __init__(self, model_dir, threads):
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_dir, device="cpu")

    def embed(self, texts):
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True).tolist()


MODELS = {"server": PaddedMiniLM, "product": SentenceTransformersMiniLM}
'''

LOOM_PADDED = '''
import sys

sys.path.insert(0, {workdir!r})
from minilm_common import PaddedMiniLM, text_of  # noqa: E402

from loom.batching.handler import Handler  # noqa: E402


class PaddedMiniLMHandler(Handler):
    """Loom's handler API around exactly the code the peers run in server mode."""

    def setup(self, ctx):
        self.model = PaddedMiniLM({model_dir!r}, ctx.num_threads)

    def decode(self, item):
        return text_of(item)

    def inference(self, texts):
        return self.model.embed(texts)

    def postprocess(self, vectors):
        return [{{"embedding": v}} for v in vectors]
'''

TS_HANDLER = '''
import sys

sys.path.insert(0, {workdir!r})
from minilm_common import MODELS, text_of  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402


class MiniLMHandler(BaseHandler):
    def initialize(self, context):
        self.model = MODELS[{mode!r}]({model_dir!r}, {threads})
        self.initialized = True

    def preprocess(self, data):
        return [text_of(row.get("data") or row.get("body")) for row in data]

    def inference(self, texts):
        return self.model.embed(texts)

    def postprocess(self, vectors):
        return [{{"embedding": v}} for v in vectors]
'''

LS_SERVER = '''
import sys

sys.path.insert(0, {workdir!r})
import litserve as ls  # noqa: E402
from minilm_common import MODELS, text_of  # noqa: E402


class MiniLMAPI(ls.LitAPI):
    def setup(self, device):
        self.model = MODELS[{mode!r}]({model_dir!r}, {threads})

    def decode_request(self, request):
        return text_of(request)

    def batch(self, texts):
        return list(texts)

    def predict(self, texts):
        if isinstance(texts, str):  # max_batch_size 1: one decoded request, no batch/unbatch
            return self.model.embed([texts])[0]
        return self.model.embed(texts)

    def unbatch(self, vectors):
        return list(vectors)

    def encode_response(self, vector):
        return {{"embedding": vector}}


if __name__ == "__main__":
    api = MiniLMAPI(max_batch_size={batch}, batch_timeout={delay_s})
    server = ls.LitServer(api, accelerator="cpu", workers_per_device={workers}, timeout=60, fast_queue={fast_queue})
    server.run(host="127.0.0.1", port={port}, log_level="warning", generate_client_file=False, num_api_servers=1)
'''

RAY_SERVER = '''
import signal
import sys
import threading

sys.path.insert(0, {workdir!r})
import ray  # noqa: E402
from minilm_common import MODELS, text_of  # noqa: E402
from ray import serve  # noqa: E402


@serve.deployment(num_replicas={workers}, ray_actor_options={{"num_cpus": 1}}, max_ongoing_requests=1024)
class MiniLM:
    def __init__(self):
        self.model = MODELS[{mode!r}]({model_dir!r}, {threads})

    @serve.batch(max_batch_size={batch}, batch_wait_timeout_s={delay_s})
    async def embed(self, texts):
        return [{{"embedding": v}} for v in self.model.embed(texts)]

    async def __call__(self, request):
        return await self.embed(text_of(await request.body()))


if __name__ == "__main__":
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False, _temp_dir={temp_dir!r})
    serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
    serve.run(MiniLM.bind(), route_prefix="/predict")
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
'''


def write_common(workdir: Path) -> None:
    (workdir / "minilm_common.py").write_text(COMMON)


def missing(peer: str, peers_bin: Path) -> str | None:
    """Why a peer cannot run (not installed in peers_bin's interpreter, no java), or None."""
    modules = {"loom": (), "torchserve": ("ts", "model_archiver", "yaml"), "litserve": ("litserve",),
               "rayserve": ("ray.serve",)}[peer]
    if not modules:
        return None
    check = "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)"
    python = peers_bin / "python"
    if not python.exists() or subprocess.run([str(python), "-c", check, *modules], capture_output=True).returncode:
        return f"{', '.join(modules)} not importable by {python}"
    if peer == "torchserve" and not _has_java():
        return "java (17+) not on PATH"
    return None


def _has_java() -> bool:
    return shutil.which("java") is not None


@contextlib.contextmanager
def serve(peer: str, mode: str, batch: int, workers: int, delay_ms: float, threads: int, workdir: Path,
          peers_bin: Path) -> Iterator[tuple[str, int]]:
    """Start `peer` in `mode` with these batching settings; yield (URL to POST {"text": ...}, session id)."""
    launch = {"loom": _loom, "torchserve": _torchserve, "litserve": _litserve, "rayserve": _rayserve}[peer]
    with launch(mode, batch, workers, delay_ms, threads, workdir, peers_bin) as served:
        yield served


def _env(threads: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), **extra}


@contextlib.contextmanager
def _running(cmd: list[str], log_path: Path, ready_url: str, timeout: float, **kwargs):
    """The server's process, once ``ready_url`` answers 200 (its own session, stopped with everything in it)."""
    with start_server(cmd, ready_url, ready_path="", timeout=timeout, log_path=log_path, **kwargs) as server:
        yield server.proc


@contextlib.contextmanager
def _loom(mode, batch, workers, delay_ms, threads, workdir, peers_bin):
    port = free_port()
    handler = "embedding"
    extra_env: dict[str, str] = {}
    if mode == "server":
        path = workdir / "loom_padded.py"
        path.write_text(LOOM_PADDED.format(workdir=str(workdir), model_dir=str(default_model_dir())))
        handler = str(path)
    elif mode == "archive":  # the very archive TorchServe serves, its BaseHandler run by Loom's torchserve handler
        handler = str(_archive(workdir / "loom-archive", workdir, threads, peers_bin))
        extra_env = {"PYTHONPATH": str(_ts_only(workdir, peers_bin)), "LOOM_HOME": str(workdir / "loom-home")}
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--serve", f"minilm={handler}", "--batch-size", str(batch),
           "--max-batch-delay", str(delay_ms), "--workers", str(workers), "--threads-per-worker", str(threads),
           "--port", str(port), "--management-port", str(free_port()), "--management-token", "bench",
           "--max-queue-size", "1024", "--log-level", "warning"]
    log = workdir / f"loom-{mode}-{batch}-{workers}.log"
    with _running(cmd, log, f"http://127.0.0.1:{port}/ping", 180, cwd=ROOT, env=_env(threads, **extra_env)) as proc:
        yield f"http://127.0.0.1:{port}/predictions/minilm", proc.pid


@contextlib.contextmanager
def _torchserve(mode, batch, workers, delay_ms, threads, workdir, peers_bin):
    home = Path(tempfile.mkdtemp(prefix=f"ts-{mode}-{batch}-{workers}-", dir=workdir))
    store = _archive(home, workdir, threads, peers_bin, "server" if mode == "archive" else mode).parent
    port, mport, metrics_port = free_port(), free_port(), free_port()
    (home / "config.properties").write_text(textwrap.dedent(f"""\
        inference_address=http://127.0.0.1:{port}
        management_address=http://127.0.0.1:{mport}
        metrics_address=http://127.0.0.1:{metrics_port}
        job_queue_size=1024
        default_workers_per_model={workers}
        disable_token_authorization=true
        enable_model_api=true
        install_py_dep_per_model=false
        """))
    env = _env(threads, PATH=f"{peers_bin}:{os.environ['PATH']}")
    # NOTE: never pipe torchserve's output (the JVM keeps the pipe open); --foreground lets us own the process.
    start = [str(peers_bin / "torchserve"), "--start", "--ncs", "--disable-token-auth", "--enable-model-api",
             "--model-store", str(store), "--ts-config", str(home / "config.properties"), "--foreground"]
    try:
        with _running(start, home / "torchserve.log", f"http://127.0.0.1:{port}/ping", 240, cwd=home, env=env) as proc:
            params = {"url": "minilm.mar", "model_name": "minilm", "batch_size": batch,
                      "max_batch_delay": int(delay_ms), "initial_workers": workers, "synchronous": "true"}
            r = httpx.post(f"http://127.0.0.1:{mport}/models", params=params, timeout=600)
            if r.status_code >= 300:
                raise RuntimeError(f"TorchServe register failed: {r.status_code} {r.text}")
            yield f"http://127.0.0.1:{port}/predictions/minilm", proc.pid
    finally:
        subprocess.run([str(peers_bin / "torchserve"), "--stop"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)


def _archive(home: Path, workdir: Path, threads: int, peers_bin: Path, mode: str = "server") -> Path:
    """minilm.mar made by the peers' torch-model-archiver from TS_HANDLER (``mode``'s model code), in home/store."""
    store = home / "store"
    store.mkdir(parents=True, exist_ok=True)
    (home / "handler.py").write_text(TS_HANDLER.format(workdir=str(workdir), mode=mode, threads=threads,
                                                       model_dir=str(default_model_dir())))
    archiver = [str(peers_bin / "torch-model-archiver"), "--model-name", "minilm", "--version", "1.0",
                "--handler", str(home / "handler.py"), "--export-path", str(store), "--force"]
    subprocess.run(archiver, check=True, cwd=home)
    return store / "minilm.mar"


def _ts_only(workdir: Path, peers_bin: Path) -> Path:
    """A folder holding only TorchServe's ``ts`` package, copied from the peers' environment: Loom's workers import
    it (BaseHandler) without the peers' torch or anything else of theirs on the path."""
    target = workdir / "ts-only"
    if not (target / "ts").is_dir():
        where = subprocess.run([str(peers_bin / "python"), "-c", "import ts, os; print(os.path.dirname(ts.__file__))"],
                               check=True, capture_output=True, text=True).stdout.strip()
        shutil.copytree(where, target / "ts")
    return target


@contextlib.contextmanager
def _litserve(mode, batch, workers, delay_ms, threads, workdir, peers_bin):
    port = free_port()
    script = workdir / f"litserve_{mode}_{batch}_{workers}.py"
    # NOTE: fast_queue (ZeroMQ between the API server and the workers) is LitServe's documented throughput
    # setting; product mode uses it, server mode keeps LitServe's default queue, as the earlier runs did.
    script.write_text(LS_SERVER.format(workdir=str(workdir), mode=mode, model_dir=str(default_model_dir()),
                                       threads=threads, batch=batch, delay_s=delay_ms / 1000, workers=workers,
                                       port=port, fast_queue=mode == "product"))
    cmd = [str(peers_bin / "python"), str(script)]
    log = workdir / f"litserve-{mode}-{batch}-{workers}.log"
    with _running(cmd, log, f"http://127.0.0.1:{port}/health", 180, cwd=workdir, env=_env(threads)) as proc:
        yield f"http://127.0.0.1:{port}/predict", proc.pid


@contextlib.contextmanager
def _rayserve(mode, batch, workers, delay_ms, threads, workdir, peers_bin):
    port = free_port()
    script = workdir / f"rayserve_{mode}_{batch}_{workers}.py"
    # Ray's session folder path must stay short (it holds unix sockets).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    script.write_text(RAY_SERVER.format(workdir=str(workdir), mode=mode, model_dir=str(default_model_dir()),
                                        threads=threads, batch=batch, delay_s=delay_ms / 1000, workers=workers,
                                        port=port, cpus=max(workers, os.cpu_count() or 1), temp_dir=temp_dir))
    cmd = [str(peers_bin / "python"), str(script)]
    log = workdir / f"rayserve-{mode}-{batch}-{workers}.log"
    env = _env(threads, RAY_USAGE_STATS_ENABLED="0", RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="1")
    try:
        with _running(cmd, log, f"http://127.0.0.1:{port}/-/healthz", 300, cwd=workdir, env=env) as proc:
            _wait_route(f"http://127.0.0.1:{port}/predict", proc, 300)
            yield f"http://127.0.0.1:{port}/predict", proc.pid
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_route(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Ray's proxy answers health before the deployment is routed: wait for one real answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Ray Serve exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(url, json={"text": "warm up"}, timeout=30).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")
