"""The image HTTP API in-process (TestClient runs the app's lifespan): OpenAI route, jobs, SSE, cancel, errors."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from loom.image.metadata import read_settings


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def client(engine, tmp_path):
    from loom.image.serve import ImageComponent
    from loom.server.app import build_app

    registry = CollectorRegistry()
    component = ImageComponent("tiny", registry, tmp_path, engine=engine, max_queued=2)
    with TestClient(build_app([component], registry)) as c:
        yield c


def wait_done(client, job_id: str) -> dict:
    events = [json.loads(line[6:]) for line in client.get(f"/v1/images/jobs/{job_id}/events").text.splitlines()
              if line.startswith("data: {")]
    assert events, "no server-sent events"
    return events


def test_openai_generations_b64_and_url(client):
    r = client.post("/v1/images/generations",
                    json={"prompt": "a sneaker", "n": 2, "size": "64x64", "seed": 3, "steps": 2})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert [read_settings(im)["seed"] for im in images] == [3, 4]
    r = client.post("/v1/images/generations",
                    json={"prompt": "a sneaker", "size": "64x64", "seed": 3, "steps": 2, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    png = client.get(url)
    assert png.headers["content-type"] == "image/png"
    again = Image.open(io.BytesIO(png.content))
    assert read_settings(again) == read_settings(images[0])  # same seed, same settings, same pixels (batching aside)
    assert np.abs(np.asarray(again, np.int16) - np.asarray(images[0], np.int16)).max() <= 2


def test_job_stream_progress_then_result(client):
    r = client.post("/v1/images/jobs", json={"prompt": "a bag", "steps": 4, "width": 64, "height": 64, "seed": 1})
    assert r.status_code == 202
    job_id = r.json()["id"]
    events = wait_done(client, job_id)
    steps = [e["progress"]["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps) and steps[-1] == 4
    assert any("preview" in e for e in events)
    final = events[-1]
    assert final["status"] == "succeeded" and final["files"] == ["0.png"]
    polled = client.get(f"/v1/images/jobs/{job_id}").json()
    assert polled["status"] == "succeeded" and polled["urls"][0].endswith(f"/v1/images/files/{job_id}/0.png")
    assert job_id in [j["id"] for j in client.get("/v1/images/jobs?status=succeeded").json()["data"]]


@pytest.mark.parametrize("task", ["vary_subtle", "vary_strong", "inpaint", "outpaint", "upscale"])
def test_every_task_through_the_api(client, photo, task):
    body = {"task": task, "prompt": "x", "image": b64(photo), "steps": 4, "seed": 2}
    if task == "inpaint":
        mask = Image.new("L", photo.size, 0)
        mask.paste(255, (8, 8, 24, 24))
        body["mask"] = "data:image/png;base64," + b64(mask)
    if task == "outpaint":
        body["outpaint_sides"] = ["right"]
    job_id = client.post("/v1/images/jobs", json=body).json()["id"]
    final = wait_done(client, job_id)[-1]
    assert final["status"] == "succeeded", final
    size = Image.open(io.BytesIO(client.get(final["urls"][0]).content)).size
    expected = {"upscale": (128, 96), "outpaint": (88, 48)}.get(task, photo.size)
    assert size == expected


def test_cancel_through_the_api(client):
    job_id = client.post("/v1/images/jobs", json={"prompt": "x", "steps": 150, "width": 64, "height": 64}).json()["id"]
    r = client.post(f"/v1/images/jobs/{job_id}/cancel")
    assert r.status_code == 200
    final = wait_done(client, job_id)[-1]
    assert final["status"] == "cancelled" and final["progress"]["step"] < 150


def test_errors_are_clear_json(client):
    assert client.get("/v1/images/jobs/nope").status_code == 404
    r = client.post("/v1/images/jobs", json={"task": "paint", "prompt": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "task"]
    assert "txt2img" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/images/jobs", json={"task": "vary_subtle", "prompt": "x", "image": "not base64!"})
    assert r.status_code == 400 and "base64" in r.json()["detail"]
    r = client.post("/v1/images/jobs", json={"task": "inpaint", "prompt": "x", "image": b64(Image.new("RGB", (8, 8)))})
    assert r.status_code == 400 and "mask" in r.json()["detail"]
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "big"}).status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": ""}).status_code == 422
    r = client.post("/v1/images/jobs", json={"prompt": "x", "image": "A" * (17 * 2**20 * 4 // 3)})
    assert r.status_code == 413


def test_options_health_and_metrics(client):
    opts = client.get("/v1/images/options").json()
    assert {"Euler a", "DPM++ 2M Karras", "UniPC", "LCM"} <= set(opts["samplers"])
    assert opts["performances"] == ["Quality", "Speed", "Extreme Speed"] and "Cinematic" in opts["styles"]
    assert client.get("/health").json()["components"]["images"]["ready"] is True
    client.post("/v1/images/generations", json={"prompt": "a sneaker", "size": "64x64", "steps": 2})
    metrics = client.get("/metrics").text
    assert 'loom_image_jobs_total{status="succeeded",task="txt2img"} 1.0' in metrics
    assert "loom_image_steps_total 2.0" in metrics


def test_sampling_tweaks_through_the_api(client):
    r = client.post("/v1/images/jobs", json={"prompt": "x", "sharpness": 31})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sharpness"]
    body = {"prompt": "a (bag:1.2)", "steps": 2, "width": 32, "height": 32, "seed": 1, "sharpness": 5,
            "adaptive_cfg": 2.5}
    final = wait_done(client, client.post("/v1/images/jobs", json=body).json()["id"])[-1]
    assert final["status"] == "succeeded"
    assert final["settings"][0]["sharpness"] == 5 and final["settings"][0]["adaptive_cfg"] == 2.5
