"""Sharpness, adaptive CFG and SDXL ADM scaling: neutral = today's pixels; each tweak checked against a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.image.guidance import gaussian_window, joint_bilateral_filter
from loom.image.presets import FOOOCUS_TWEAKS, NEUTRAL, get_performance
from loom.image.request import ImageRequest

BASE = dict(prompt="a (red:1.2) sneaker", seed=3, steps=3, width=64, height=64, guidance=6.0, sampler="Euler")


def pixels(engine, **kwargs) -> np.ndarray:
    return np.asarray(engine.generate(ImageRequest(**(BASE | kwargs))).images[0], np.int16)


def test_filter_with_a_flat_guide_is_a_gaussian_blur():
    x = torch.randn(2, 4, 16, 16)
    r = 6
    kernel = gaussian_window(r, 3.0).reshape(1, 1, 13, 13)
    kernel = (kernel / kernel.sum()).repeat(4, 1, 1, 1)
    ref = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), kernel, groups=4)
    torch.testing.assert_close(joint_bilateral_filter(x, torch.ones_like(x)), ref, rtol=1e-5, atol=1e-5)


def test_filter_does_not_blur_across_an_edge_of_the_guide():
    guide = torch.zeros(1, 4, 16, 16)
    guide[..., 8:] = 50.0  # two flat regions, far apart after standardizing
    x = torch.zeros(1, 4, 16, 16)
    x[..., 8:] = 1000.0
    leak = joint_bilateral_filter(x, guide)[..., 7].max()
    assert leak < 0.1 * joint_bilateral_filter(x, torch.ones_like(x))[..., 7].min()  # a flat guide blurs across


def test_filter_equals_a_neighbour_by_neighbour_reference():
    """The same filter written as a sum over the 169 offsets of the window (no unfold)."""
    torch.manual_seed(0)
    x, guide = torch.randn(2, 4, 9, 10), torch.randn(2, 4, 9, 10) * 3 + 1
    r = 6
    g = (guide - guide.mean(dim=(1, 2, 3), keepdim=True)) / (guide.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    xp, gp = (F.pad(t, (r, r, r, r), mode="reflect") for t in (x, g))
    num, den = torch.zeros_like(x), torch.zeros(2, 1, 9, 10)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted_x = xp[..., r + dy : r + dy + 9, r + dx : r + dx + 10]
            shifted_g = gp[..., r + dy : r + dy + 9, r + dx : r + dx + 10]
            color = torch.exp(-0.5 * (shifted_g - g).abs().sum(1, keepdim=True) ** 2 / 9.0)
            w = color * np.exp(-(dy * dy + dx * dx) / 18.0)
            num, den = num + shifted_x * w, den + w
    torch.testing.assert_close(joint_bilateral_filter(x, guide), num / den, rtol=1e-5, atol=1e-5)


def test_neutral_settings_reproduce_todays_output_exactly(engine):
    plain = pixels(engine)
    neutral = pixels(engine, sharpness=0.0, adaptive_cfg=30.0, adm_scaler_positive=1.0, adm_scaler_negative=1.0,
                     adm_scaler_end=0.0)
    assert np.array_equal(plain, neutral)
    assert ImageRequest(prompt="x").tweaks() == NEUTRAL  # the default preset (Speed) is neutral
    assert get_performance("Quality").tweaks == FOOOCUS_TWEAKS


@pytest.mark.parametrize("tweak", [{"sharpness": 30.0}, {"adaptive_cfg": 2.0}])
def test_each_tweak_changes_the_output_deterministically(engine, tweak):
    plain = pixels(engine)
    first, second = pixels(engine, **tweak), pixels(engine, **tweak)
    assert np.array_equal(first, second)
    assert np.abs(first - plain).max() > 0


def test_adaptive_cfg_at_the_first_step_is_the_lower_guidance(engine):
    """One DPM++ step at t = 999 (progress 0): guidance 12 with adaptive CFG 3 samples as guidance 3 does."""
    one = dict(steps=1, sampler="DPM++ 2M")
    eased = pixels(engine, guidance=12.0, adaptive_cfg=3.0, **one)
    lower = pixels(engine, guidance=3.0, **one)
    full = pixels(engine, guidance=12.0, **one)
    assert np.abs(eased - lower).max() <= 1
    assert np.abs(eased - full).max() > 5


def test_tweaks_are_recorded_and_validated(engine):
    settings = engine.generate(ImageRequest(**(BASE | {"sharpness": 4.0}))).settings[0]
    assert settings["sharpness"] == 4.0 and settings["adaptive_cfg"] == 30.0
    with pytest.raises(ValueError, match="sharpness must be in 0..30"):
        ImageRequest(prompt="x", sharpness=31)
    with pytest.raises(ValueError, match="adm_scaler_end must be in 0..1"):
        ImageRequest(prompt="x", adm_scaler_end=1.5)


@pytest.fixture(scope="module")
def xl_engine():
    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_sdxl_pipeline

    return ImageEngine(tiny_sdxl_pipeline(seed=0), name="tiny-xl")


def test_sdxl_adm_scaling_equals_diffusers_size_conditioning(xl_engine):
    """ADM 1.5 / 0.8 for all of sampling = diffusers told the original sizes were 1.5x and 0.8x."""
    req = dict(prompt="a sneaker", negative_prompt="blurry", seed=2, steps=2, width=64, height=48, guidance=5.0,
               sampler="Euler")
    ours = xl_engine.generate(ImageRequest(**req, adm_scaler_positive=1.5, adm_scaler_negative=0.8,
                                           adm_scaler_end=1.0)).images[0]
    plain = xl_engine.generate(ImageRequest(**req)).images[0]
    neutral = xl_engine.generate(ImageRequest(**req, adm_scaler_positive=1.5, adm_scaler_negative=0.8,
                                              adm_scaler_end=0.0)).images[0]
    pipe = xl_engine.txt2img
    theirs = pipe("a sneaker", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, width=64,
                  height=48, original_size=(72, 96), target_size=(48, 64), negative_original_size=(48 * 0.8, 64 * 0.8),
                  negative_target_size=(48, 64), generator=torch.Generator().manual_seed(2)).images[0]
    assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    assert np.array_equal(np.asarray(plain), np.asarray(neutral))
    assert not np.array_equal(np.asarray(plain), np.asarray(ours))
