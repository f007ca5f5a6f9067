"""Performance presets (steps, guidance, sampler) and aspect-ratio presets, as Fooocus offers them.

Sizes scale with the model: an aspect ratio maps to the model's native pixel area (512² for SD 1.x, 1024² for SDXL,
32² for the Fashion-MNIST demo), rounded to the size unit the UNet needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Performance:
    name: str
    steps: int
    guidance: float
    sampler: str


PERFORMANCES: dict[str, Performance] = {
    p.name: p
    for p in (
        Performance("Quality", 60, 4.0, "DPM++ 2M Karras"),
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
