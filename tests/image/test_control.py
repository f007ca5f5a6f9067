"""ControlNet jobs (canny, depth) on tiny random ControlNets: diffusers' own result, stop-at and weight, shared
components, the queue (progress, cancel), the API, and PyraCanny / depth preprocessing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from loom.image.control import ControlNets, pyramid_canny
from loom.image.engine import ImageEngine, images_equal
from loom.image.request import ImageRequest
from loom.image.samplers import make_sampler
from loom.image.tiny import save_tiny_controlnet, save_tiny_depth_estimator, tiny_pipeline, tiny_sdxl_pipeline
from tests.image.test_api import wait_done

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    unet = tiny_pipeline(seed=0).unet
    return {"canny": save_tiny_controlnet(unet, str(root / "canny"), seed=1),
            "depth": save_tiny_controlnet(unet, str(root / "depth"), seed=2),
            "estimator": save_tiny_depth_estimator(str(root / "dpt"))}


@pytest.fixture(scope="module")
def controlled(folders):
    """A tiny engine (its own pipeline: the session's is left alone) with both ControlNets and the estimator."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    controls = ControlNets.load(pipe, {"canny": folders["canny"], "depth": folders["depth"]}, folders["estimator"])
    return ImageEngine(pipe, name="tiny", controls=controls)


def square(size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(image).rectangle((16, 12, 47, 35), fill=(230, 200, 40))
    return image


def job(**kw) -> ImageRequest:
    return ImageRequest(**({"task": "controlnet", "prompt": "a house", "image": square(), "seed": 3, "steps": 3,
                            "width": 64, "height": 64} | kw))


def test_pyramid_canny_finds_the_square_and_only_it():
    edges = np.asarray(pyramid_canny(square()).convert("L"), np.float32)
    assert edges.shape == (48, 64) and edges.max() == 255
    border = np.zeros_like(edges, bool)
    border[8:40, 12:52] = True
    border[16:32, 20:44] = False  # a ring of +-4 px around the outline: coarse scales leave a halo that wide
    assert edges[~border].max() < 64, "edge response away from the square's outline"
    for y, x in ((12, 30), (35, 30), (24, 16), (24, 47)):  # each side of the square
        assert edges[y - 2 : y + 3, x - 2 : x + 3].max() > 128
    flat = pyramid_canny(Image.new("RGB", (40, 30), (90, 90, 90)))
    assert np.asarray(flat).max() == 0


def test_pyramid_of_one_scale_is_plain_canny_stretched():
    from skimage.feature import canny

    image = square()
    rgb = np.asarray(image)
    total = sum(canny(rgb[..., c], sigma=1.0, low_threshold=64, high_threshold=128).astype(np.float32)
                for c in range(3))
    lo, hi = np.percentile(total, 1), np.percentile(total, 99)
    expected = ((total - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    got = np.asarray(pyramid_canny(image, scales=(1.0,)).convert("L"))
    assert np.array_equal(got, expected)


def test_job_equals_diffusers_controlnet_pipeline(controlled):
    from diffusers import StableDiffusionControlNetPipeline

    req = job(control_weight=0.8, control_stop_at=0.7, num_images=2)
    result = controlled.generate(req)
    pipe = controlled.txt2img
    reference = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=controlled.controls.models["canny"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
        scheduler=make_sampler(req.resolved()[2], controlled.base_scheduler_config))
    reference.set_progress_bar_config(disable=True)
    control = pyramid_canny(square()).resize((64, 64), Image.BILINEAR)
    expected = reference(prompt=["a house"] * 2, image=control, num_inference_steps=3,
                         guidance_scale=req.resolved()[1], width=64, height=64,
                         generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                         controlnet_conditioning_scale=0.8, control_guidance_end=0.7).images
    assert all(images_equal(a, b, tolerance=1) for a, b in zip(result.images, expected))
    s = result.settings[1]
    assert (s["task"], s["control_type"], s["control_weight"], s["control_stop_at"], s["seed"]) == (
        "controlnet", "canny", 0.8, 0.7, 4)
    assert (s["width"], s["height"]) == (64, 64)


def test_weight_zero_is_plain_txt2img_and_stop_at_sets_the_steps(controlled):
    plain = controlled.generate(ImageRequest(prompt="a house", seed=3, steps=4, width=64, height=64))
    off = controlled.generate(job(steps=4, control_weight=0.0))
    on = controlled.generate(job(steps=4))
    assert images_equal(off.images[0], plain.images[0])
    assert not images_equal(on.images[0], plain.images[0], tolerance=2)
    scales = []
    model = controlled.controls.models["canny"]
    hook = model.register_forward_pre_hook(lambda _m, args, kwargs: scales.append(kwargs["conditioning_scale"]),
                                           with_kwargs=True)
    try:
        controlled.generate(job(steps=4, control_stop_at=0.5))
    finally:
        hook.remove()
    assert scales == [1.0, 1.0, 0.0, 0.0]  # steps 1-2 of 4: (i + 1) / 4 <= 0.5 (diffusers' control_guidance_end)
    assert not images_equal(controlled.generate(job(steps=4, control_stop_at=1.0)).images[0], on.images[0])


def test_control_pipelines_share_the_base_components(controlled):
    for kind in ("canny", "depth"):
        pipe = controlled.controls.pipeline(kind)
        assert pipe.unet is controlled.txt2img.unet and pipe.vae is controlled.txt2img.vae
        assert pipe.text_encoder is controlled.txt2img.text_encoder
        assert pipe.controlnet is controlled.controls.models[kind]


def test_depth_job_with_the_estimator_and_with_a_ready_map(controlled):
    depth_map = controlled.controls.preprocess("depth", square())
    assert depth_map.size == (64, 48) and depth_map.mode == "RGB"
    estimated = controlled.generate(job(control_type="depth"))
    ready = controlled.generate(job(control_type="depth", image=depth_map, control_preprocess=False))
    assert images_equal(estimated.images[0], ready.images[0])


def test_sdxl_controlnet_job(tmp_path):
    pipe = tiny_sdxl_pipeline(seed=0)
    controls = ControlNets.load(pipe, {"canny": save_tiny_controlnet(pipe.unet, str(tmp_path / "cn"), seed=1)})
    engine = ImageEngine(pipe, name="tiny-xl", controls=controls)
    assert type(controls.pipeline("canny")).__name__ == "StableDiffusionXLControlNetPipeline"
    assert controls.pipeline("canny").text_encoder_2 is pipe.text_encoder_2
    plain = engine.generate(ImageRequest(prompt="a house", seed=3, steps=2, width=64, height=64))
    steered = engine.generate(job(steps=2))
    assert steered.images[0].size == (64, 64) and not images_equal(steered.images[0], plain.images[0], 2)


def test_missing_controlnet_or_estimator_is_a_clear_error(folders):
    pipe = tiny_pipeline(seed=0)
    engine = ImageEngine(pipe, controls=ControlNets.load(pipe, {"depth": folders["depth"]}))
    with pytest.raises(ValueError, match="--image-controlnet canny=DIR"):
        engine.check(job())
    with pytest.raises(ValueError, match="--image-depth-estimator"):
        engine.check(job(control_type="depth"))
    engine.check(job(control_type="depth", control_preprocess=False))
    with pytest.raises(ValueError, match="control_weight"):
        job(control_weight=3)
    with pytest.raises(ValueError, match="needs an input image"):
        job(image=None)


def test_queue_progress_and_cancel(controlled, tmp_path):
    from loom.image.jobs import CANCELLED, SUCCEEDED, JobQueue

    queue = JobQueue(controlled, tmp_path / "out", max_queued=4, preview_interval_s=0.0)
    queue.start()
    steps = []
    try:
        done = queue.submit(job(steps=3))
        queue.wait(done.id, timeout=60)
        calls, cancelled = [], None

        def on_forward(*_):
            calls.append(1)
            if len(calls) == 2:
                queue.cancel(cancelled.id)

        hook = controlled.controls.models["canny"].register_forward_hook(on_forward)
        try:
            cancelled = queue.submit(job(steps=30))
            queue.wait(cancelled.id, timeout=60)
        finally:
            hook.remove()
        steps = (done.step, done.total_steps)
    finally:
        queue.stop(drain=False)
    assert done.status == SUCCEEDED and steps == (3, 3) and len(done.files) == 1
    assert cancelled.status == CANCELLED and cancelled.step == 2 and len(calls) == 2 and not cancelled.files


def test_api_controlnet_job_preprocess_route_and_errors(controlled, tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from loom.image.serve import ImageComponent
    from loom.server.app import build_app

    buf = io.BytesIO()
    square().save(buf, format="PNG")
    photo = base64.b64encode(buf.getvalue()).decode()
    registry = CollectorRegistry()
    component = ImageComponent("tiny", registry, tmp_path, engine=controlled)
    with TestClient(build_app([component], registry)) as client:
        options = client.get("/v1/images/options").json()
        assert options["controlnets"] == ["canny", "depth"] and "controlnet" in options["tasks"]
        r = client.post("/v1/images/control/preprocess", json={"image": photo, "control_type": "canny"})
        assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (64, 48)
        edges = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        assert np.array_equal(np.asarray(edges), np.asarray(pyramid_canny(square())))
        body = {"task": "controlnet", "prompt": "a house", "image": photo, "seed": 3, "steps": 2, "width": 64,
                "height": 64, "control_weight": 0.5}
        job_id = client.post("/v1/images/jobs", json=body).json()["id"]
        state = wait_done(client, job_id)[-1]
        assert state["status"] == "succeeded" and state["settings"][0]["control_weight"] == 0.5
        assert client.post("/v1/images/jobs", json=body | {"control_type": "edges"}).status_code == 422
        assert client.post("/v1/images/jobs", json={k: v for k, v in body.items() if k != "image"}).status_code == 400
    pipe = tiny_pipeline(seed=0)
    bare = ImageEngine(pipe, name="bare")  # no ControlNet loaded
    registry = CollectorRegistry()
    with TestClient(build_app([ImageComponent("bare", registry, tmp_path / "b", engine=bare)], registry)) as client:
        r = client.post("/v1/images/jobs", json=body)
        assert r.status_code == 400 and "--image-controlnet canny=DIR" in r.json()["detail"]
        r = client.post("/v1/images/control/preprocess", json={"image": photo, "control_type": "depth"})
        assert r.status_code == 400 and "--image-depth-estimator" in r.json()["detail"]
        assert client.post("/v1/images/control/preprocess", json={"image": photo}).status_code == 200
