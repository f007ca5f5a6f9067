"""Performance presets (steps, guidance, sampler) and aspect-ratio presets, as Fooocus offers them.

Sizes scale with the model: an aspect ratio maps to the model's native pixel area (512² for SD 1.x, 1024² for SDXL,
32² for the Fashion-MNIST demo), rounded to the size unit the UNet needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_GUIDANCE = 30.0
TWEAK_RANGES = {"sharpness": (0.0, 30.0), "adaptive_cfg": (1.0, MAX_GUIDANCE), "adm_scaler_positive": (0.1, 3.0),
                "adm_scaler_negative": (0.1, 3.0), "adm_scaler_end": (0.0, 1.0)}


@dataclass(frozen=True, slots=True)
class SamplingTweaks:
    """Fooocus' sampling tweaks (``loom.image.guidance``); the defaults are neutral: diffusers' sampling, untouched."""

    sharpness: float = 0.0
    """Weight of the anisotropic filter on the positive prediction, in thousandths per unit of progress (0..30)."""
    adaptive_cfg: float = MAX_GUIDANCE
    """Guidance above this is eased in from this value (1..30); at 30 it never acts."""
    adm_scaler_positive: float = 1.0
    """SDXL: the positive prompt's "original size" is this many times the image's (0.1..3)."""
    adm_scaler_negative: float = 1.0
    """SDXL: the negative prompt's "original size" is this many times the image's (0.1..3)."""
    adm_scaler_end: float = 0.0
    """SDXL: the scaled sizes apply while progress is below this fraction of sampling (0..1)."""

    def __post_init__(self):
        for name, (low, high) in TWEAK_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low:g}..{high:g}, got {value}")


NEUTRAL = SamplingTweaks()
# Fooocus' defaults (sharpness 2, adaptive CFG 7, ADM 1.5 / 0.8 until 30 % of sampling)
FOOOCUS_TWEAKS = SamplingTweaks(sharpness=2.0, adaptive_cfg=7.0, adm_scaler_positive=1.5, adm_scaler_negative=0.8,
                                adm_scaler_end=0.3)


@dataclass(frozen=True, slots=True)
class Performance:
    name: str
    steps: int
    guidance: float
    sampler: str
    tweaks: SamplingTweaks = NEUTRAL


# NOTE: Speed (the default) and Extreme Speed sample exactly as diffusers does; Quality adds Fooocus' tweaks.
PERFORMANCES: dict[str, Performance] = {
    p.name: p
    for p in (
        Performance("Quality", 60, 4.0, "DPM++ 2M Karras", FOOOCUS_TWEAKS),
        Performance("Speed", 30, 4.0, "DPM++ 2M Karras"),
        Performance("Extreme Speed", 8, 1.0, "LCM"),
    )
}
DEFAULT_PERFORMANCE = "Speed"
ASPECT_RATIOS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9"]
MAX_ASPECT = 8.0

# Fooocus: Vary (Subtle) / Vary (Strong) are img2img at these strengths; Upscale's refinement pass uses 0.382.
VARY_SUBTLE_STRENGTH = 0.5
VARY_STRONG_STRENGTH = 0.85
UPSCALE_STRENGTH = 0.382
UPSCALE_FACTORS = (1.5, 2.0)
REFINER_SWITCH = 0.8  # Fooocus' default: the refiner takes the last 20 % of the steps
OUTPAINT_RATIO = 0.3
VARY_STRENGTH = {"vary_subtle": VARY_SUBTLE_STRENGTH, "vary_strong": VARY_STRONG_STRENGTH}


def get_performance(name: str) -> Performance:
    if name not in PERFORMANCES:
        raise ValueError(f"unknown performance preset {name!r}; choose one of {', '.join(PERFORMANCES)}")
    return PERFORMANCES[name]


def round_to(value: float, unit: int) -> int:
    return max(unit, int(round(value / unit)) * unit)


def parse_aspect_ratio(ratio: str) -> tuple[float, float]:
    """"W:H" -> (W, H), both positive and at most MAX_ASPECT apart (a 100000:1 ratio is no picture)."""
    try:
        w, h = (float(x) for x in ratio.split(":"))
        if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect_ratio must look like 'W:H' with positive numbers, e.g. '16:9' (presets: "
                         f"{', '.join(ASPECT_RATIOS)}), got {ratio[:32]!r}") from None
    if max(w / h, h / w) > MAX_ASPECT:
        raise ValueError(f"aspect_ratio {ratio!r} is more than {MAX_ASPECT}:1; choose a less extreme ratio")
    return w, h


def aspect_ratio_size(ratio: str, native: int, unit: int) -> tuple[int, int]:
    """(width, height) with the model's native area and the given "W:H" ratio, multiples of ``unit``."""
    w, h = parse_aspect_ratio(ratio)
    scale = native / math.sqrt(w * h)
    return round_to(w * scale, unit), round_to(h * scale, unit)
