"""ControlNet jobs (canny, depth) on tiny random ControlNets: diffusers' own result, stop-at and weight, shared
components, the queue (progress, cancel), the API, and PyraCanny / depth preprocessing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from loom.image.control import ControlNets, canny_edges, cover, pyramid_canny
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
    total = sum(canny(rgb[..., c], sigma=0.0, low_threshold=64, high_threshold=128).astype(np.float32)
                for c in range(3))
    lo, hi = np.percentile(total, 1), np.percentile(total, 99)
    expected = ((total - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    got = np.asarray(pyramid_canny(image, scales=(1.0,)).convert("L"))
    assert np.array_equal(got, expected)


def aligned_square() -> np.ndarray:
    """64x64 RGB, a 32x32 square at 16..47 (red and green steps, none in blue): every 4x4 block is one colour, so
    area downsampling to 1/2 and 1/4 is exact."""
    image = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(230, 200, 20))
    return np.asarray(image)


def upsample2(a: np.ndarray) -> np.ndarray:
    """PIL's bilinear 2x upsampling by hand: output pixel 2k sits at input k - 1/4, 2k + 1 at k + 1/4 (taps beyond
    the edge dropped, i.e. the edge repeated)."""
    for axis in (0, 1):
        p = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in (0, 1)], mode="edge")
        mid = np.take(p, range(1, p.shape[axis] - 1), axis)
        before, after = np.take(p, range(0, p.shape[axis] - 2), axis), np.take(p, range(2, p.shape[axis]), axis)
        a = np.stack([0.75 * mid + 0.25 * before, 0.75 * mid + 0.25 * after], axis + 1)
        a = a.reshape([2 * n if ax == axis else n for ax, n in enumerate(mid.shape)])
    return a


def test_canny_edges_lie_on_the_squares_outline():
    red = aligned_square()[..., 0]
    edges = canny_edges(red).astype(bool)
    band = np.zeros_like(edges)  # the pixel pairs each side's step lies between: rows / columns 15|16 and 47|48
    for lo, hi in ((15, 16), (47, 48)):
        band[lo : hi + 1, 15:49] = band[15:49, lo : hi + 1] = True
    assert edges.any() and not (edges & ~band).any(), "an edge pixel off the outline"
    for k in range(18, 46):  # every position along each side (corners rounded off)
        assert edges[15:17, k].any() and edges[47:49, k].any() and edges[k, 15:17].any() and edges[k, 47:49].any()
    assert not canny_edges(aligned_square()[..., 2]).any()  # blue has no step


def test_pyramid_canny_equals_the_scales_combined_by_hand():
    rgb = aligned_square()
    total = np.zeros((64, 64))
    for c in range(3):
        channel = rgb[..., c]
        quarter, half = channel[::4, ::4], channel[::2, ::2]  # exact area averages: the blocks are uniform
        running = canny_edges(quarter)
        running = 0.75 * upsample2(running) + 0.25 * canny_edges(half)
        running = 0.75 * upsample2(running) + 0.25 * canny_edges(channel)
        total += running
    lo, hi = np.percentile(total, 1), np.percentile(total, 99)
    expected = ((total - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    got = np.asarray(pyramid_canny(Image.fromarray(rgb), scales=(0.25, 0.5, 1.0)))
    assert got.shape == (64, 64, 3) and (got == got[..., :1]).all()  # 3 equal channels
    assert np.array_equal(got[..., 0], expected)
    assert len(np.unique(expected)) > 3  # the coarse scales did add their halo


def test_cover_resizes_and_centre_crops_as_fooocus():
    image = square()  # 64x48
    # to 32x32: height fits (48 -> 32), width 64 * 32 // 48 = 42, crop from 42 // 2 - 16 = 5
    assert images_equal(cover(image, (32, 32)), image.resize((42, 32), Image.LANCZOS).crop((5, 0, 37, 32)))
    # to 64x16: width fits, height 48 * 64 // 64 = 48, crop from 48 // 2 - 8 = 16
    assert images_equal(cover(image, (64, 16)), image.crop((0, 16, 64, 32)))


def test_job_equals_diffusers_controlnet_pipeline(controlled, folders):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    req = job(control_weight=0.8, control_stop_at=0.7, num_images=2)
    result = controlled.generate(req)
    pipe = controlled.txt2img
    reference = StableDiffusionControlNetPipeline(  # diffusers' own: runs its plain ControlNet on every step
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=ControlNetModel.from_pretrained(folders["canny"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
        scheduler=make_sampler(req.resolved()[2], controlled.base_scheduler_config))
    reference.set_progress_bar_config(disable=True)
    # the 64x48 input covering 64x64 (Fooocus' crop: 85x64, columns 10..73), then PyraCanny at that size
    control = pyramid_canny(square().resize((85, 64), Image.LANCZOS).crop((10, 0, 74, 64)))
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
    scales, runs = [], []
    model = controlled.controls.models["canny"]
    hooks = [model.register_forward_pre_hook(lambda _m, args, kwargs: scales.append(kwargs["conditioning_scale"]),
                                             with_kwargs=True),
             model.controlnet_cond_embedding.register_forward_hook(lambda *_: runs.append(1))]  # a real forward
    try:
        controlled.generate(job(steps=4, control_stop_at=0.5))
        assert scales == [1.0, 1.0, 0.0, 0.0]  # steps 1-2 of 4: (i + 1) / 4 <= 0.5 (diffusers' control_guidance_end)
        assert len(runs) == 2  # the ControlNet ran on those 2 steps only (CFG's two halves are one batch)
        controlled.generate(job(steps=4, control_weight=0.0))
        assert len(runs) == 2  # weight 0: never ran
    finally:
        for hook in hooks:
            hook.remove()
    assert not images_equal(controlled.generate(job(steps=4, control_stop_at=1.0)).images[0], on.images[0])


def test_control_pipelines_share_the_base_components_and_leave_other_jobs_alone(controlled):
    for kind in ("canny", "depth"):
        pipe = controlled.controls.pipeline(kind)
        assert pipe.unet is controlled.txt2img.unet and pipe.vae is controlled.txt2img.vae
        assert pipe.text_encoder is controlled.txt2img.text_encoder and pipe.tokenizer is controlled.txt2img.tokenizer
        assert pipe.controlnet is controlled.controls.models[kind]
    req = ImageRequest(prompt="a house", seed=5, steps=3, width=64, height=64)
    controlled.generate(job())  # a controlnet job first: nothing of it may stay behind
    bare = ImageEngine(tiny_pipeline(seed=0), name="bare")  # the same weights, no ControlNet ever loaded
    assert images_equal(controlled.generate(req).images[0], bare.generate(req).images[0])


def test_depth_map_is_transformers_depth_estimation_output(controlled, folders):
    from transformers import pipeline

    depth_map = controlled.controls.preprocess("depth", square())
    assert depth_map.size == (64, 48) and depth_map.mode == "RGB"
    expected = pipeline("depth-estimation", model=folders["estimator"])(square())["depth"]  # min..max -> 0..255
    assert images_equal(depth_map, expected.convert("RGB"), tolerance=1)
    assert np.asarray(depth_map).min() == 0 and np.asarray(depth_map).max() >= 254


def test_depth_job_with_the_estimator_and_with_a_ready_map(controlled):
    depth_map = controlled.controls.control_map("depth", square(), (64, 64))  # what the job makes of the photo
    estimated = controlled.generate(job(control_type="depth"))
    ready = controlled.generate(job(control_type="depth", image=depth_map, control_preprocess=False))
    assert images_equal(estimated.images[0], ready.images[0])


def test_sdxl_controlnet_job_equals_diffusers(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    folder = save_tiny_controlnet(pipe.unet, str(tmp_path / "cn"), seed=1)
    controls = ControlNets.load(pipe, {"canny": folder})
    engine = ImageEngine(pipe, name="tiny-xl", controls=controls)
    assert type(controls.pipeline("canny")).__name__ == "StableDiffusionXLControlNetPipeline"
    assert controls.pipeline("canny").text_encoder_2 is pipe.text_encoder_2
    assert controls.pipeline("canny").unet is pipe.unet
    req = job(steps=3, control_weight=1.5, control_stop_at=0.6)
    steered = engine.generate(req).images[0]
    reference = StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "scheduler"},
        controlnet=ControlNetModel.from_pretrained(folder),
        scheduler=make_sampler(req.resolved()[2], engine.base_scheduler_config),
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
    reference.set_progress_bar_config(disable=True)
    control = pyramid_canny(square().resize((85, 64), Image.LANCZOS).crop((10, 0, 74, 64)))
    expected = reference(prompt=["a house"], image=control, num_inference_steps=3, guidance_scale=req.resolved()[1],
                         width=64, height=64, generator=[torch.Generator().manual_seed(3)],
                         controlnet_conditioning_scale=1.5, control_guidance_end=0.6).images[0]
    assert images_equal(steered, expected, tolerance=1)
    plain = engine.generate(ImageRequest(prompt="a house", seed=3, steps=3, width=64, height=64))
    assert not images_equal(steered, plain.images[0], 2)


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
        r = client.post("/v1/images/control/preprocess", json={"image": photo, "width": 64, "height": 64})
        assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (64, 64)  # what a 64x64 job gets
        cropped = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        expected = pyramid_canny(square().resize((85, 64), Image.LANCZOS).crop((10, 0, 74, 64)))
        assert np.array_equal(np.asarray(cropped), np.asarray(expected))
        r = client.post("/v1/images/control/preprocess", json={"image": photo, "aspect_ratio": "2:1"})
        size = controlled.output_size(job(width=None, height=None, aspect_ratio="2:1"))
        assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == size != (64, 64)
        r = client.post("/v1/images/control/preprocess", json={"image": photo, "aspect_ratio": "wide"})
        assert r.status_code == 400 and "aspect_ratio" in r.json()["detail"]
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


def test_control_tab_in_headless_chromium(controlled, tmp_path):
    """The Control tab end to end: upload, Preview map (the route's map appears), Generate with control (the job is a
    controlnet job with the tab's settings)."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from scripts.image_ui_screenshot import generate_in_browser, image_stack

    square().save(tmp_path / "square.png")

    def preview(driver):
        driver.find_element(By.CSS_SELECTOR, "#tab-control-preview").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#control-map img"))
        WebDriverWait(driver, 60).until(lambda d: "control map ready" in d.find_element(By.CSS_SELECTOR,
                                                                                          "#progress").text)

    with image_stack(controlled, tmp_path / "out") as (api_url, ui_url):
        shown = generate_in_browser(ui_url, "a house", tmp_path / "ui.png", timeout=120, tab="tab-control",
                                    tab_image=str(tmp_path / "square.png"), before_run=preview)
        history = httpx.get(f"{api_url}/v1/images/jobs").json()["data"]
    assert shown["progress"].startswith("done in") and shown["gallery_images"] >= 1
    settings = history[0]["settings"][0]
    assert history[0]["status"] == "succeeded" and settings["task"] == "controlnet"
    assert (settings["control_type"], settings["control_weight"], settings["control_stop_at"],
            settings["control_preprocess"]) == ("canny", 1.0, 0.5, True)


def test_control_tab_shown_only_with_controlnets(controlled, tmp_path):
    import httpx

    from scripts.image_ui_screenshot import image_stack

    def tab_visible(engine) -> bool:
        with image_stack(engine, tmp_path / engine.name) as (_, ui_url):
            components = httpx.get(f"{ui_url}/config").json()["components"]
        return next(c["props"]["visible"] for c in components if c["props"].get("elem_id") == "tab-control")

    assert tab_visible(controlled) is True
    assert tab_visible(ImageEngine(tiny_pipeline(seed=0), name="bare")) is False


def test_imagine_and_serve_flags(controlled, folders, tmp_path, capsys):
    """`loom imagine --task controlnet --controlnet canny=DIR` gives the engine's own result; `--image-controlnet`
    values are parsed (and refused, naming the flag)."""
    import argparse

    from loom.cli import main
    from loom.image.metadata import read_settings
    from loom.image.serve import add_serve_arguments, parse_controlnets
    from loom.image.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"), seed=0)  # the weights of tiny_pipeline(seed=0), as `controlled`
    square().save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["imagine", "a house", "--model", model, "--task", "controlnet", "--controlnet",
                 f"canny={folders['canny']}", "--image", str(tmp_path / "in.png"), "--control-weight", "0.7",
                 "--control-stop-at", "0.4", "--seed", "3", "--steps", "3", "--width", "64", "--height", "64",
                 "--upscaler", "none", "--out", str(out)]) == 0
    settings = read_settings(out)
    assert (settings["task"], settings["control_weight"], settings["control_stop_at"]) == ("controlnet", 0.7, 0.4)
    expected = controlled.generate(job(control_weight=0.7, control_stop_at=0.4)).images[0]
    assert images_equal(Image.open(out).convert("RGB"), expected, tolerance=1)
    assert main(["imagine", "x", "--model", model, "--controlnet", "edges=/x", "--out", str(out)]) == 2
    assert "--controlnet 'edges=/x': give TYPE=DIR" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--image-controlnet", "canny=/m/c", "--image-controlnet", "depth=/m/d",
                              "--image-depth-estimator", "/m/dpt"])
    assert parse_controlnets(args.image_controlnet, "--image-controlnet") == {"canny": "/m/c", "depth": "/m/d"}
    assert args.image_depth_estimator == "/m/dpt"
    with pytest.raises(ValueError, match="--image-controlnet 'canny': give TYPE=DIR"):
        parse_controlnets(["canny"], "--image-controlnet")
