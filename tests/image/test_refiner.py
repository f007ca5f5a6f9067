"""Upscale 1.5x / 2x output sizes, and the SDXL refiner swap: the refiner runs exactly the steps after the switch."""

from __future__ import annotations

import numpy as np
import pytest

from loom.image.request import ImageRequest


@pytest.mark.parametrize(("factor", "size"), [(1.5, (96, 72)), (2.0, (128, 96))])
def test_upscale_factor_sizes(engine, photo, factor, size):
    req = ImageRequest(task="upscale", prompt="x", image=photo, seed=6, steps=3, upscale_factor=factor)
    assert engine.output_size(req) == size
    assert engine.generate(req).images[0].size == size


def test_upscale_factor_is_checked():
    with pytest.raises(ValueError, match=r"upscale_factor must be one of \(1.5, 2.0\)"):
        ImageRequest(task="upscale", prompt="x", upscale_factor=3.0)


@pytest.fixture(scope="module")
def refined():
    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_sdxl_pipeline, tiny_sdxl_refiner

    base = tiny_sdxl_pipeline(seed=0)
    return ImageEngine(base, name="tiny-xl", refiner=tiny_sdxl_refiner(base))


def count_calls(module, calls: list, tag: str):
    return module.register_forward_hook(lambda *a: calls.append(tag))


@pytest.mark.parametrize(("sampler", "steps", "switch", "k"), [("Euler", 4, 0.5, 2), ("DPM++ 2M Karras", 5, 0.8, 4),
                                                               ("UniPC", 6, 0.3, 2)])
def test_refiner_swap_at_step_k_runs_the_refiner_for_the_remaining_steps(refined, sampler, steps, switch, k):
    calls, done = [], []
    hooks = [count_calls(refined.txt2img.unet, calls, "base"), count_calls(refined.refiner.unet, calls, "refiner")]
    try:
        result = refined.generate(ImageRequest(prompt="a sneaker", seed=1, steps=steps, width=32, height=32,
                                               guidance=5.0, sampler=sampler, refiner_switch=switch),
                                  on_step=lambda d, t, _: done.append((d, t)))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["base"] * k + ["refiner"] * (steps - k)  # one batched (CFG) UNet call per step
    assert done == [(i, steps) for i in range(1, steps + 1)]
    assert result.settings[0]["refiner_step"] == k


def test_refiner_output_is_deterministic_and_off_at_switch_one(refined):
    req = dict(prompt="a sneaker", seed=2, steps=4, width=32, height=32, guidance=5.0, sampler="Euler")
    a = refined.generate(ImageRequest(**req, refiner_switch=0.5)).images[0]
    b = refined.generate(ImageRequest(**req, refiner_switch=0.5)).images[0]
    base_only = refined.generate(ImageRequest(**req, refiner_switch=1.0)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(base_only))


def test_no_refiner_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="no refiner"):
        engine.check(ImageRequest(prompt="x", refiner_switch=0.5))
    engine.check(ImageRequest(prompt="x", refiner_switch=1.0))


def test_quality_tweaks_act_on_the_refiner_too(refined):
    """The refiner's time ids carry an aesthetic score (5 per row); ADM scaling and sharpness still apply."""
    req = dict(prompt="a (sneaker:1.3)", seed=2, steps=4, width=32, height=32, guidance=5.0, sampler="Euler",
               refiner_switch=0.5)
    plain = refined.generate(ImageRequest(**req)).images[0]
    tweaked = refined.generate(ImageRequest(**req, sharpness=20, adm_scaler_positive=1.5, adm_scaler_negative=0.8,
                                            adm_scaler_end=1.0)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(tweaked))


def test_too_few_steps_for_the_strength_still_denoise_once(engine, photo):
    """1 step x Vary (Subtle)'s strength 0.5 rounds to no step in diffusers (which then fails); Loom runs one."""
    done = []
    result = engine.generate(ImageRequest(task="vary_subtle", prompt="x", image=photo, seed=1, steps=1),
                             on_step=lambda d, t, _: done.append((d, t)))
    assert result.images[0].size == photo.size and done == [(1, 1)]
    with pytest.raises(ValueError, match="denoise must be in 0.005..1"):
        ImageRequest(task="vary_subtle", prompt="x", image=photo, denoise=0.001)
