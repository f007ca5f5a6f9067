"""SDXL through the same engine: a tiny random SDXL pipeline runs txt2img, vary and inpaint with shared components."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loom.image.request import ImageRequest


@pytest.fixture(scope="module")
def xl_engine():
    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_sdxl_pipeline

    return ImageEngine(tiny_sdxl_pipeline(seed=0), name="tiny-xl")


def test_sdxl_tasks_share_components_and_keep_unmasked_pixels(xl_engine, photo):
    assert type(xl_engine.inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
    assert xl_engine.inpaint.text_encoder_2 is xl_engine.txt2img.text_encoder_2
    assert xl_engine.img2img.unet is xl_engine.txt2img.unet
    a = xl_engine.generate(ImageRequest(prompt="a sneaker", seed=2, steps=3, width=64, height=48))
    b = xl_engine.generate(ImageRequest(prompt="a sneaker", seed=2, steps=3, width=64, height=48))
    assert a.images[0].size == (64, 48) and (np.asarray(a.images[0]) == np.asarray(b.images[0])).all()
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (0, 0, 24, 24))
    inpainted = xl_engine.generate(ImageRequest(task="inpaint", prompt="x", image=photo, mask=mask, seed=1, steps=3,
                                                mask_blur=1))
    out = np.asarray(inpainted.images[0], np.int16)
    assert np.abs(out[32:, 32:] - np.asarray(photo, np.int16)[32:, 32:]).max() <= 1
    varied = xl_engine.generate(ImageRequest(task="vary_subtle", prompt="x", image=photo, seed=1, steps=4))
    assert varied.images[0].size == photo.size
