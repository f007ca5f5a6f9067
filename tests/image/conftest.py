"""Fixtures for the image tests: the session's tiny random engine (tests/conftest.py), prompt expansion on SmolLM2,
and an input photo."""

from __future__ import annotations

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def engine(tiny_image_engine):
    return tiny_image_engine


@pytest.fixture(scope="session")
def expander(smollm2_path):
    """Prompt expansion on the packaged SmolLM2, an engine of its own (loaded once: ~3 s)."""
    from loom.image.expansion import PromptExpander

    return PromptExpander.load(str(smollm2_path))


@pytest.fixture()
def expanding(engine, expander):
    """The session's tiny image engine with the expander attached for one test."""
    engine.expander = expander
    yield engine
    engine.expander = None


@pytest.fixture()
def photo() -> Image.Image:
    """A 64x48 RGB gradient with a square (a deterministic input image)."""
    import numpy as np

    y, x = np.mgrid[0:48, 0:64]
    array = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    array[10:30, 20:40] = (200, 30, 90)
    return Image.fromarray(array)
