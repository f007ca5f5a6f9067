"""Every task end to end on a tiny random pipeline: sizes, seeds, masks, cancel, and parity with plain diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loom.image.engine import JobCancelled
from loom.image.request import ImageRequest


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


def test_one_set_of_components_for_every_task(engine):
    for pipe in (engine.img2img, engine.inpaint):
        assert pipe.unet is engine.txt2img.unet
        assert pipe.vae is engine.txt2img.vae
        assert pipe.text_encoder is engine.txt2img.text_encoder


@pytest.mark.parametrize(("kwargs", "size"), [({"width": 96, "height": 64}, (96, 64)),
                                              ({"aspect_ratio": "1:1"}, (64, 64)),
                                              ({"aspect_ratio": "16:9"}, (88, 48))])
def test_txt2img_sizes(engine, kwargs, size):
    result = engine.generate(ImageRequest(prompt="a sneaker", seed=1, steps=2, **kwargs))
    assert [im.size for im in result.images] == [size]
    assert (result.settings[0]["width"], result.settings[0]["height"]) == size


def test_same_seed_same_image_and_per_image_seeds(engine):
    req = dict(prompt="a sneaker", steps=3, width=64, height=64)
    a = engine.generate(ImageRequest(seed=5, num_images=2, **req))
    b = engine.generate(ImageRequest(seed=5, num_images=2, **req))
    c = engine.generate(ImageRequest(seed=6, **req))
    assert all((arr(x) == arr(y)).all() for x, y in zip(a.images, b.images))
    assert not (arr(a.images[0]) == arr(a.images[1])).all()
    # image 1 of seed 5 is image 0 of seed 6: each image records a seed that remakes it alone
    assert [s["seed"] for s in a.settings] == [5, 6]
    assert np.abs(arr(a.images[1]) - arr(c.images[0])).max() <= 2


def test_matches_plain_diffusers(engine):
    """Loom's txt2img is diffusers' StableDiffusionPipeline with the chosen scheduler: same pixels."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    req = ImageRequest(prompt="an ankle boot", negative_prompt="blurry", seed=11, steps=4, guidance=5.0,
                       sampler="UniPC", width=64, height=64)
    ours = engine.generate(req).images[0]
    ref = StableDiffusionPipeline(**{k: getattr(engine.txt2img, k)
                                     for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                  scheduler=UniPCMultistepScheduler.from_config(engine.base_scheduler_config),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("an ankle boot", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, width=64,
                 height=64, generator=torch.Generator().manual_seed(11)).images[0]
    assert np.abs(arr(ours) - arr(theirs)).max() <= 1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "UniPC", "LCM", "DDIM"])
def test_samplers_by_name(engine, sampler):
    result = engine.generate(ImageRequest(prompt="a bag", seed=2, steps=3, sampler=sampler, width=64, height=64))
    assert result.settings[0]["sampler"] == sampler
    assert type(engine.txt2img.scheduler).__name__ in {"EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                                       "UniPCMultistepScheduler", "LCMScheduler", "DDIMScheduler"}
    assert arr(result.images[0]).std() > 0


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        ImageRequest(prompt="x", sampler="Euler b")


@pytest.mark.parametrize(("task", "fraction"), [("vary_subtle", 0.5), ("vary_strong", 0.85)])
def test_vary_runs_img2img_at_fooocus_strengths(engine, photo, task, fraction):
    totals = []
    result = engine.generate(ImageRequest(task=task, prompt="x", image=photo, seed=3, steps=20),
                             on_step=lambda d, t, _: totals.append(t))
    assert result.images[0].size == (64, 48)
    assert totals[-1] == int(20 * fraction) and len(totals) == int(20 * fraction)


def test_inpaint_keeps_pixels_outside_the_mask(engine, photo):
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (16, 8, 40, 32))
    result = engine.generate(ImageRequest(task="inpaint", prompt="x", image=photo, mask=mask, seed=4, steps=3,
                                          mask_blur=2))
    out, src = arr(result.images[0]), arr(photo)
    assert result.images[0].size == photo.size
    far = np.ones(src.shape[:2], bool)
    far[8 - 8 : 32 + 8, 16 - 8 : 40 + 8] = False  # beyond the soft edge (4 blur radii)
    assert np.abs(out[far] - src[far]).max() <= 1
    inside = np.zeros(src.shape[:2], bool)
    inside[12:28, 20:36] = True
    assert np.abs(out[inside] - src[inside]).mean() > 5  # the masked area was repainted


def test_outpaint_keeps_the_original_region(engine, photo):
    result = engine.generate(ImageRequest(task="outpaint", prompt="x", image=photo, seed=5, steps=3,
                                          outpaint_sides=["left", "bottom"]))
    out = arr(result.images[0])
    w, h = photo.size
    assert out.shape[1] >= w * 1.3 - 1 and out.shape[0] >= h * 1.3 - 1
    assert out.shape[1] % 8 == 0 and out.shape[0] % 8 == 0
    left = out.shape[1] - w  # all the new width is on the left, all the new height below
    assert np.abs(out[:h, left:] - arr(photo)).max() == 0


def test_upscale_doubles_and_tiles_large_images(engine, photo):
    totals = []
    result = engine.generate(ImageRequest(task="upscale", prompt="x", image=photo, seed=6, steps=10),
                             on_step=lambda d, t, _: totals.append(t))
    assert result.images[0].size == (128, 96)
    # 128x96 at the tiny model's 64-px native tile with 16-px overlap: 3 x 2 tiles of int(10 * 0.382) steps
    assert totals[-1] == 3 * 2 * 3


def test_cancel_stops_within_one_step(engine):
    calls = []
    hook = engine.txt2img.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(JobCancelled):
            engine.generate(ImageRequest(prompt="x", seed=1, steps=20, width=64, height=64),
                            should_stop=lambda: len(calls) >= 3)
    finally:
        hook.remove()
    assert len(calls) == 3  # the step during which cancel was asked finishes; no UNet call after it


def test_png_metadata_reproduces_the_image(engine, tmp_path):
    from loom.image.metadata import read_settings, request_from_png, save_png

    req = ImageRequest(prompt="a __color__ dress", styles=["Photograph"], negative_prompt="ugly", seed=None, steps=3,
                       sampler="Euler a", aspect_ratio="4:3", num_images=2)
    first = engine.generate(req)
    path = save_png(first.images[1], tmp_path / "x.png", first.settings[1])
    settings = read_settings(path)
    assert settings["seed"] == req.seed + 1 and settings["final_prompt"].startswith("photograph of a ")
    again = engine.generate(request_from_png(path))
    assert np.abs(arr(again.images[0]) - arr(Image.open(path))).max() <= 2
    assert "Steps: 3, Sampler: Euler a" in Image.open(path).text["parameters"]


def test_preview_is_an_image(engine):
    latents = torch.randn(1, 4, 8, 8)
    assert engine.preview(latents).size == (16, 16)
