"""Performance presets (steps, guidance, sampler, sampling tweaks, LoRAs) and aspect-ratio presets, as Fooocus has.

Three presets are packaged; an operator adds or overrides presets with a JSON file named by ``LOOM_PRESETS``: a list
of ``{"name", "steps", "guidance", "sampler", "sharpness", "adaptive_cfg", "adm_scaler_positive",
"adm_scaler_negative", "adm_scaler_end", "loras": [{"name", "weight"}]}`` (all but ``name`` optional: Speed's values,
neutral tweaks, no LoRAs).

Sizes scale with the model: an aspect ratio maps to the model's native pixel area (512² for SD 1.x, 1024² for SDXL,
32² for the Fashion-MNIST demo), rounded to the size unit the UNet needs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from loom.image.limits import MAX_STEPS
from loom.image.loras import LoRASpec, merge_loras
from loom.image.samplers import SAMPLERS

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
    loras: tuple[LoRASpec, ...] = ()
    """LoRAs every job of this preset uses (names in the server's LoRA folder); a job's own come after them."""

    def __post_init__(self):
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"preset {self.name!r}: steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(f"preset {self.name!r}: guidance must be in 0..{MAX_GUIDANCE:g}, got {self.guidance}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"preset {self.name!r}: unknown sampler {self.sampler!r}; one of {', '.join(SAMPLERS)}")
        merge_loras(list(self.loras), "")


# NOTE: Speed (the default) and Extreme Speed sample exactly as diffusers does; Quality adds Fooocus' tweaks.
PACKAGED_PERFORMANCES: dict[str, Performance] = {
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


def read_performances(path: str | Path) -> dict[str, Performance]:
    """Presets from a JSON file (see the module docstring)."""
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise ValueError(f"{path}: a presets file holds a JSON list of objects with at least a \"name\"")
    tweak_names = {f.name for f in fields(SamplingTweaks)}
    speed = PACKAGED_PERFORMANCES[DEFAULT_PERFORMANCE]
    presets = {}
    for e in entries:
        unknown = set(e) - tweak_names - {"name", "steps", "guidance", "sampler", "loras"}
        if unknown:
            raise ValueError(f"{path}: preset {e['name']!r} has unknown keys {sorted(unknown)}")
        presets[e["name"]] = Performance(
            e["name"], int(e.get("steps", speed.steps)), float(e.get("guidance", speed.guidance)),
            e.get("sampler", speed.sampler), SamplingTweaks(**{k: float(v) for k, v in e.items() if k in tweak_names}),
            tuple(LoRASpec(lora["name"], float(lora.get("weight", 1.0))) for lora in e.get("loras", [])),
        )
    return presets


@lru_cache(maxsize=4)
def _load(extra: str | None) -> dict[str, Performance]:
    return PACKAGED_PERFORMANCES | (read_performances(extra) if extra else {})


def load_performances() -> dict[str, Performance]:
    """Every preset by name: the packaged ones, then $LOOM_PRESETS' (a name given again overrides)."""
    return _load(os.environ.get("LOOM_PRESETS"))


def get_performance(name: str) -> Performance:
    presets = load_performances()
    if name not in presets:
        raise ValueError(f"unknown performance preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


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
