"""Fixtures for the image tests: the session's tiny random engine (tests/conftest.py) and an input photo."""

from __future__ import annotations

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def engine(tiny_image_engine):
    return tiny_image_engine


@pytest.fixture()
def photo() -> Image.Image:
    """A 64x48 RGB gradient with a square (a deterministic input image)."""
    import numpy as np

    y, x = np.mgrid[0:48, 0:64]
    array = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    array[10:30, 20:40] = (200, 30, 90)
    return Image.fromarray(array)
