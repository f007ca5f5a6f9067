"""Image prompts (IP-Adapter) on a tiny random adapter: diffusers' own result, stop-at, other jobs untouched, the
queue (progress, cancel), the API, and the folder layout's errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from loom.image.engine import ImageEngine, images_equal
from loom.image.ip_adapter import IPAdapter, find_weights
from loom.image.request import ImageRequest
from loom.image.samplers import make_sampler
from loom.image.tiny import save_tiny_ip_adapter, tiny_pipeline
from tests.image.test_api import wait_done

pytestmark = pytest.mark.slow

PLAIN = dict(prompt="a house", seed=5, steps=3, width=64, height=64, num_images=2)


def picture() -> Image.Image:
    y, x = np.mgrid[0:40, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 6, (x * y) % 255], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine with the adapter, adapter folder, the plain job's images before the adapter was loaded)."""
    torch.set_num_threads(1)
    folder = save_tiny_ip_adapter(tiny_pipeline(seed=0).unet, str(tmp_path_factory.mktemp("ipa")))
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    before = ImageEngine(pipe, name="tiny").generate(ImageRequest(**PLAIN)).images
    engine = ImageEngine(pipe, name="tiny", ip_adapter=IPAdapter.load(pipe, folder))
    return engine, folder, before


def reference(folder: str, req: ImageRequest, engine: ImageEngine, stop_step: int | None = None):
    """diffusers' own IP-Adapter pipeline on a fresh copy of the same components (its own loader, its own scale)."""
    from transformers import CLIPImageProcessor

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.feature_extractor = CLIPImageProcessor.from_pretrained(f"{folder}/image_encoder")
    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(req.ip_adapter_weight)
    steps, guidance, sampler = req.resolved()
    pipe.scheduler = make_sampler(sampler, engine.base_scheduler_config)

    def stop(p, i, t, kwargs):
        if stop_step is not None and i + 1 == stop_step:
            p.set_ip_adapter_scale(0.0)
        return kwargs

    return pipe(prompt=[req.prompt] * req.num_images, ip_adapter_image=picture(), num_inference_steps=steps,
                guidance_scale=guidance, width=64, height=64, callback_on_step_end=stop,
                generator=[torch.Generator().manual_seed(req.seed + i) for i in range(req.num_images)]).images


def job(**kw) -> ImageRequest:
    return ImageRequest(**(PLAIN | {"task": "image_prompt", "image": picture()} | kw))


def test_image_prompt_equals_diffusers_ip_adapter(setup):
    engine, folder, _ = setup
    req = job(ip_adapter_weight=0.9, ip_adapter_stop_at=1.0)
    result = engine.generate(req)
    expected = reference(folder, req, engine)
    assert all(images_equal(a, b, tolerance=1) for a, b in zip(result.images, expected))
    s = result.settings[1]
    assert (s["task"], s["ip_adapter_weight"], s["ip_adapter_steps"], s["seed"]) == ("image_prompt", 0.9, 3, 6)


def test_stop_at_drops_the_image_prompt_after_its_steps(setup):
    engine, folder, _ = setup
    req = job(steps=4, ip_adapter_weight=1.0, ip_adapter_stop_at=0.5)
    result = engine.generate(req)
    assert result.settings[0]["ip_adapter_steps"] == 2
    expected = reference(folder, req, engine, stop_step=2)
    assert all(images_equal(a, b, tolerance=1) for a, b in zip(result.images, expected))
    full = engine.generate(job(steps=4, ip_adapter_weight=1.0, ip_adapter_stop_at=1.0))
    assert not images_equal(full.images[0], result.images[0])


def test_other_jobs_run_the_plain_unet(setup):
    engine, _, before = setup
    after = engine.generate(ImageRequest(**PLAIN)).images
    assert all(images_equal(a, b) for a, b in zip(before, after))
    prompted = engine.generate(job(ip_adapter_weight=1.0))
    assert not images_equal(prompted.images[0], before[0], tolerance=2)
    again = engine.generate(ImageRequest(**PLAIN)).images  # after an image-prompt job, too
    assert all(images_equal(a, b) for a, b in zip(before, again))
    assert engine.txt2img.unet.encoder_hid_proj is None


def test_queue_progress_and_cancel(setup, tmp_path):
    from loom.image.jobs import CANCELLED, SUCCEEDED, JobQueue

    engine, _, before = setup
    queue = JobQueue(engine, tmp_path / "out", max_queued=4, preview_interval_s=0.0)
    queue.start()
    calls, cancelled = [], None

    def on_forward(*_):
        calls.append(1)
        if len(calls) == 2:
            queue.cancel(cancelled.id)

    try:
        done = queue.submit(job(num_images=1))
        queue.wait(done.id, timeout=60)
        hook = engine.txt2img.unet.register_forward_hook(on_forward)
        try:
            cancelled = queue.submit(job(steps=30, num_images=1))
            queue.wait(cancelled.id, timeout=60)
        finally:
            hook.remove()
        plain = queue.submit(ImageRequest(**PLAIN))  # a cancelled image prompt leaves the plain UNet behind
        queue.wait(plain.id, timeout=60)
    finally:
        queue.stop(drain=False)
    assert done.status == SUCCEEDED and (done.step, done.total_steps) == (3, 3) and len(done.files) == 1
    assert cancelled.status == CANCELLED and cancelled.step == 2 and len(calls) == 2 and not cancelled.files
    assert plain.status == SUCCEEDED
    assert images_equal(Image.open(plain.files[0]).convert("RGB"), before[0])


def test_api_image_prompt_job_and_errors(setup, tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from loom.image.serve import ImageComponent
    from loom.server.app import build_app

    engine, _, _ = setup
    buf = io.BytesIO()
    picture().save(buf, format="PNG")
    body = {"task": "image_prompt", "prompt": "a house", "image": base64.b64encode(buf.getvalue()).decode(),
            "seed": 5, "steps": 2, "width": 64, "height": 64, "ip_adapter_weight": 0.7}
    registry = CollectorRegistry()
    with TestClient(build_app([ImageComponent("tiny", registry, tmp_path, engine=engine)], registry)) as client:
        assert client.get("/v1/images/options").json()["model"]["has_ip_adapter"] is True
        job_id = client.post("/v1/images/jobs", json=body).json()["id"]
        state = wait_done(client, job_id)[-1]
        assert state["status"] == "succeeded" and state["settings"][0]["ip_adapter_weight"] == 0.7
        assert client.post("/v1/images/jobs", json=body | {"ip_adapter_weight": 5}).status_code == 422
    bare = ImageEngine(tiny_pipeline(seed=0), name="bare")
    registry = CollectorRegistry()
    with TestClient(build_app([ImageComponent("bare", registry, tmp_path / "b", engine=bare)], registry)) as client:
        r = client.post("/v1/images/jobs", json=body)
        assert r.status_code == 400 and "--image-ip-adapter" in r.json()["detail"]


def test_folder_layout_errors(setup, tmp_path):
    _, folder, _ = setup
    weights, encoder = find_weights(folder)
    assert weights.name == "ip-adapter.safetensors" and encoder.name == "image_encoder"
    assert find_weights(weights) == (weights, encoder)  # the file itself
    with pytest.raises(FileNotFoundError, match="image_encoder"):
        (tmp_path / "a.safetensors").write_bytes(b"")
        find_weights(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found 2"):
        find_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        find_weights(tmp_path / "missing")
