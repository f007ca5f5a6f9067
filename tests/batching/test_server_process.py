"""A real `loom serve` process: three models (MiniLM embeddings, a tiny ViT, a toy handler from a module path),
HTTP on loopback, the generated management token, scaling under load and a clean SIGTERM."""

from __future__ import annotations

import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from loom.bench.process import free_port, start_server
from tests.batching.conftest import image_bytes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_vit_dir):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "models.yaml").write_text(
        "models:\n  echo:\n    handler: tests.batching.toy_handlers#EchoHandler\n    batch_size: 8\n"
        "    max_batch_delay: 200\n    dispatch_when_idle: false\n    options: {sleep_s: 0.02}\n")
    port, mport = free_port(), free_port()
    token_file = tmp / "token.json"
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--port", str(port), "--management-port", str(mport),
           "--management-token-file", str(token_file), "--log-level", "warning", "--config", str(tmp / "models.yaml"),
           "--serve", "minilm=embedding", "--serve", f"vit=image-classifier:{tiny_vit_dir}", "--batch-size", "16",
           "--threads-per-worker", "1"]
    server = start_server(cmd, f"http://127.0.0.1:{port}", ready_path="/ping", log_path=tmp / "server.log",
                          env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    children = psutil.Process(server.proc.pid).children(recursive=True)
    try:
        token = json.loads(token_file.read_text())["management"]
        yield {"proc": server.proc, "url": server.url, "mgmt": f"http://127.0.0.1:{mport}", "token": token,
               "token_file": token_file, "process": server}
    finally:
        server.stop(grace=10)
        for child in children:  # never leak a worker, whatever happened above
            if child.is_running():
                child.kill()


def test_generated_token_is_printed_written_private_and_required(server):
    token_file: Path = server["token_file"]
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert server["token"] in server["process"].log_tail(100_000)  # printed at start-up
    assert httpx.get(f"{server['mgmt']}/models").status_code == 401
    assert httpx.get(f"{server['mgmt']}/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    listed = httpx.get(f"{server['mgmt']}/models", headers={"Authorization": f"Bearer {server['token']}"})
    assert sorted(m["name"] for m in listed.json()["models"]) == ["echo", "minilm", "vit"]


def test_openai_embeddings_equal_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    from loom.batching.handlers.embedding import default_model_dir

    texts = ["A man is eating food.", "Dynamic batching on two cores.", "Ünïcödé text, too — with emoji 🙂"]
    response = httpx.post(f"{server['url']}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    ours = torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    reference = SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, reference.float(), dim=1).min().item() > 0.9999
    assert body["object"] == "list" and body["model"] == "minilm"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts) * 3


def test_concurrent_http_requests_are_batched(server):
    def post(i: int) -> dict:
        return httpx.post(f"{server['url']}/predictions/echo", json=i, timeout=30).json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    assert sorted(r["item"] for r in results) == list(range(8))
    assert max(r["batch_size"] for r in results) >= 4
    assert len({r["batch"] for r in results}) < 8


def test_image_classifier_over_http(server):
    png = httpx.post(f"{server['url']}/predictions/vit", content=image_bytes("PNG", 3), timeout=30,
                     headers={"content-type": "image/png"})
    junk = httpx.post(f"{server['url']}/predictions/vit", content=b"junk", headers={"content-type": "image/png"})
    assert png.status_code == 200
    labels = png.json()
    assert len(labels) == 5 and {x["label"] for x in labels} == {"cat", "dog", "ship", "tree", "car"}
    assert abs(sum(x["score"] for x in labels) - 1.0) < 1e-5
    assert junk.status_code == 400 and "PNG or JPEG" in junk.json()["error"]["message"]


def test_scaling_under_http_load_loses_no_request(server):
    auth = {"Authorization": f"Bearer {server['token']}"}

    def post(i: int) -> tuple[int, int | None]:
        r = httpx.post(f"{server['url']}/predictions/echo", json=i, timeout=60)
        return r.status_code, r.json().get("pid")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, i) for i in range(160)]
        up = httpx.put(f"{server['mgmt']}/models/echo", json={"workers": 2}, headers=auth, timeout=60)
        time.sleep(0.3)
        down = httpx.put(f"{server['mgmt']}/models/echo", json={"workers": 1}, headers=auth, timeout=60)
        results = [f.result() for f in futures]
    assert up.json()["num_workers"] == 2 and down.json()["num_workers"] == 1
    assert [status for status, _ in results] == [200] * 160


def test_sigterm_drains_and_leaves_no_worker_processes(server):
    proc = server["proc"]
    workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) >= 3  # one per model (plus multiprocessing's resource tracker)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    assert [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []
