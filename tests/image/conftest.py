"""Fixtures for the image tests: one tiny random engine shared by the session (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def engine():
    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_pipeline
    from loom.image.upscaler import ESPCNUpscaler

    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return ImageEngine(pipe, name="tiny", upscaler=ESPCNUpscaler(hidden=8, mid=8).eval())


@pytest.fixture()
def photo() -> Image.Image:
    """A 64x48 RGB gradient with a square (a deterministic input image)."""
    import numpy as np

    y, x = np.mgrid[0:48, 0:64]
    array = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    array[10:30, 20:40] = (200, 30, 90)
    return Image.fromarray(array)
