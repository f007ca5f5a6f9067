"""What one image job asks for: ``ImageRequest``, a dataclass that checks itself, and the result it yields.

A request is self-contained and JSON-able (input images travel as PIL objects in Python and as base64 PNG over HTTP),
so the same request reproduces the same images: it is what Loom writes into every PNG's metadata.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from PIL import Image

from loom.image.limits import MAX_IMAGES, MAX_STEPS  # noqa: F401 - re-exported for the API's schema
from loom.image.loras import LoRASpec, merge_loras
from loom.image.presets import (
    ASPECT_RATIOS,
    OUTPAINT_RATIO,
    TWEAK_RANGES,
    UPSCALE_FACTORS,
    SamplingTweaks,
    get_performance,
    parse_aspect_ratio,
)
from loom.image.prompt_weights import check_weights
from loom.image.samplers import SAMPLERS
from loom.image.styles import load_styles
from loom.image.wildcards import check_wildcards

TASKS = ("txt2img", "vary_subtle", "vary_strong", "inpaint", "outpaint", "upscale", "controlnet", "image_prompt")
SIZED_TASKS = ("txt2img", "controlnet", "image_prompt")
"""Tasks whose size comes from width / height / aspect_ratio, not from the input image."""
CONTROL_TYPES = ("canny", "depth")
IMAGE_TASKS = TASKS[1:]
SIDES = ("left", "right", "top", "bottom")
MAX_SIDE = 4096
MAX_PROMPT_CHARS = 4000
MAX_STYLES = 16
MAX_MASK_BLUR = 256
MAX_SEED = 2**63 - 1


@dataclass(slots=True)
class ImageRequest:
    task: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)
    performance: str = "Speed"
    steps: int | None = None
    """None: the performance preset's steps."""
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None
    """None or -1: a random seed, chosen once and recorded."""
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    """"W:H" at the model's native area; ignored when width and height are given."""
    num_images: int = 1
    denoise: float | None = None
    """img2img / inpaint strength; None: the task's default (vary 0.5 / 0.85, inpaint 1.0, upscale 0.382)."""
    image: Image.Image | None = None
    mask: Image.Image | None = None
    """inpaint: white = repaint, black = keep."""
    mask_blur: int | None = None
    """Soft mask edge in pixels; None: 1/32 of the image's short side."""
    outpaint_sides: list[str] = field(default_factory=list)
    outpaint_ratio: float = OUTPAINT_RATIO
    sharpness: float | None = None
    """Fooocus' sharpness (0..30; 0 = off); None: the performance preset's (Quality 2, others 0)."""
    adaptive_cfg: float | None = None
    """Guidance above this is eased in from it (1..30; 30 = off); None: the preset's (Quality 7, others 30)."""
    adm_scaler_positive: float | None = None
    """SDXL: positive "original size" factor (0.1..3; 1 = off); None: the preset's (Quality 1.5)."""
    adm_scaler_negative: float | None = None
    """SDXL: negative "original size" factor (0.1..3; 1 = off); None: the preset's (Quality 0.8)."""
    adm_scaler_end: float | None = None
    """SDXL: ADM scaling applies until this fraction of sampling (0..1); None: the preset's (Quality 0.3)."""
    loras: list[dict] = field(default_factory=list)
    """Up to 5 ``{"name", "weight"}`` from the server's LoRA folder; ``<lora:NAME:WEIGHT>`` in the prompt adds more."""
    upscale_factor: float = 2.0
    """upscale: 1.5 or 2 times the input's sides."""
    control_type: str = "canny"
    """controlnet: which loaded ControlNet steers the job ("canny" or "depth")."""
    control_weight: float = 1.0
    """controlnet: the ControlNet's residual scale (0..2; diffusers' controlnet_conditioning_scale)."""
    control_stop_at: float = 0.5
    """controlnet: the ControlNet acts on this first fraction of the steps (0..1; Fooocus' default 0.5)."""
    control_preprocess: bool = True
    """controlnet: make the map from ``image`` (PyraCanny edges, estimated depth); False: ``image`` is the map."""
    ip_adapter_weight: float = 0.6
    """image_prompt: the IP-Adapter's scale (0..2; Fooocus' default 0.6)."""
    ip_adapter_stop_at: float = 0.5
    """image_prompt: the image prompt acts on the first max(1, round(stop_at x steps)) steps (0..1; default 0.5)."""
    expansion: bool = False
    """Expand the prompt with the server's LLM first (Fooocus' "V2"; seeded by each image's seed, so repeatable)."""
    refiner_switch: float | None = None
    """txt2img on SDXL with a refiner: the fraction of steps the base model runs before the refiner takes over
    (0..1; 1 = no refiner); None: 0.8 when the engine has a refiner, else none."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        get_performance(self.performance)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.guidance is not None and not 0.0 <= self.guidance <= 30.0:
            raise ValueError(f"guidance must be in 0..30, got {self.guidance}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be in 1..{MAX_IMAGES}, got {self.num_images}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not 8 <= value <= MAX_SIDE:
                raise ValueError(f"{name} must be in 8..{MAX_SIDE} pixels, got {value}")
        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            parse_aspect_ratio(self.aspect_ratio)
        if self.denoise is not None and not 1 / MAX_STEPS <= self.denoise <= 1.0:
            raise ValueError(f"denoise must be in {1 / MAX_STEPS:g}..1, got {self.denoise}")
        if self.mask_blur is not None and not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise ValueError(f"mask_blur must be in 0..{MAX_MASK_BLUR} pixels, got {self.mask_blur}")
        if self.upscale_factor not in UPSCALE_FACTORS:
            raise ValueError(f"upscale_factor must be one of {UPSCALE_FACTORS}, got {self.upscale_factor}")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch <= 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1] (1 = no refiner), got {self.refiner_switch}")
        if self.control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {', '.join(CONTROL_TYPES)}, got {self.control_type!r}")
        if not 0.0 <= self.control_weight <= 2.0:
            raise ValueError(f"control_weight must be in 0..2, got {self.control_weight}")
        if not 0.0 < self.control_stop_at <= 1.0:
            raise ValueError(f"control_stop_at must be in (0, 1], got {self.control_stop_at}")
        self.control_weight, self.control_stop_at = float(self.control_weight), float(self.control_stop_at)
        if not 0.0 <= self.ip_adapter_weight <= 2.0:
            raise ValueError(f"ip_adapter_weight must be in 0..2, got {self.ip_adapter_weight}")
        if not 0.0 < self.ip_adapter_stop_at <= 1.0:
            raise ValueError(f"ip_adapter_stop_at must be in (0, 1], got {self.ip_adapter_stop_at}")
        if self.seed is not None and self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED}, got {self.seed}")
        self._check_text()
        self._check_inputs()
        self.tweaks()
        self.loras = [asdict(spec) for spec in self._listed_loras()]
        self.lora_specs()
        if self.seed is None or self.seed < 0:
            self.seed = random.randrange(2**31)

    def _check_text(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} has {len(getattr(self, name))} characters; at most {MAX_PROMPT_CHARS}")
        if len(self.styles) > MAX_STYLES:
            raise ValueError(f"at most {MAX_STYLES} styles per request, got {len(self.styles)}")
        unknown = [name for name in self.styles if name not in load_styles()]
        if unknown:
            raise ValueError(f"unknown style(s) {[n[:64] for n in unknown[:4]]}; GET /v1/images/options lists them")
        check_wildcards(self.prompt)
        check_weights(self.prompt, "prompt")
        check_weights(self.negative_prompt, "negative_prompt")

    def _check_inputs(self) -> None:
        if self.task in IMAGE_TASKS and self.image is None:
            raise ValueError(f"task {self.task!r} needs an input image")
        if self.task == "inpaint" and self.mask is None:
            raise ValueError("task 'inpaint' needs a mask (white = repaint, black = keep)")
        if self.task == "outpaint":
            bad = [s for s in self.outpaint_sides if s not in SIDES]
            if bad or not self.outpaint_sides:
                raise ValueError(f"outpaint needs outpaint_sides from {SIDES}, got {self.outpaint_sides}")
            if not 0.05 <= self.outpaint_ratio <= 1.0:
                raise ValueError(f"outpaint_ratio must be in 0.05..1, got {self.outpaint_ratio}")

    def settings(self) -> dict[str, Any]:
        """The JSON-able settings (everything but the input images)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "mask")}

    def resolved(self) -> tuple[int, float, str]:
        """(steps, guidance, sampler) after the performance preset fills what was left unset."""
        perf = get_performance(self.performance)
        return (
            self.steps if self.steps is not None else perf.steps,
            self.guidance if self.guidance is not None else perf.guidance,
            self.sampler if self.sampler is not None else perf.sampler,
        )

    def _listed_loras(self) -> list[LoRASpec]:
        try:
            return [spec if isinstance(spec, LoRASpec) else LoRASpec(**spec) for spec in self.loras]
        except TypeError:
            raise ValueError('each LoRA is {"name": NAME, "weight": WEIGHT}') from None

    def lora_specs(self) -> list[LoRASpec]:
        """The preset's LoRAs, the listed ones, then the prompt's ``<lora:...>`` tags (later weights win), at most 5."""
        return merge_loras(list(get_performance(self.performance).loras) + self._listed_loras(), self.prompt)

    def tweaks(self) -> SamplingTweaks:
        """Sampling tweaks: the request's own values where set, the performance preset's elsewhere."""
        preset = get_performance(self.performance).tweaks
        return SamplingTweaks(**{name: getattr(preset, name) if getattr(self, name) is None else getattr(self, name)
                                 for name in TWEAK_RANGES})

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **inputs) -> ImageRequest:
        """Rebuild a request from ``settings()`` output (PNG metadata), unknown keys ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names and k not in ("image", "mask")}, **inputs)


@dataclass(slots=True)
class ImageResult:
    """Images of one job, each with the exact settings that reproduce it on its own (seed per image)."""

    images: list[Image.Image]
    settings: list[dict[str, Any]]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"images": len(self.images)}
