"""Settings in every PNG: a ``loom`` text chunk (JSON) plus an A1111-style ``parameters`` line for other tools.

    save_png(image, path, settings); read_settings(path) -> dict; request_from_png(path) -> ImageRequest
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from loom.image.presets import MAX_GUIDANCE
from loom.image.request import ImageRequest

KEY = "loom"


def parameters_line(s: dict[str, Any]) -> str:
    """A1111's human-readable form: prompt, negative, then "Steps: .., Sampler: .., ..."."""
    tail = (f"Steps: {s.get('steps')}, Sampler: {s.get('sampler')}, CFG scale: {s.get('guidance')}, "
            f"Seed: {s.get('seed')}, Size: {s.get('width')}x{s.get('height')}")
    if s.get("sharpness"):
        tail += f", Sharpness: {s['sharpness']}"
    if s.get("adaptive_cfg") is not None and s["adaptive_cfg"] < MAX_GUIDANCE:
        tail += f", Adaptive CFG: {s['adaptive_cfg']}"
    if s.get("loras"):
        tail += ", LoRAs: " + " ".join(f"{lora['name']}:{lora['weight']}" for lora in s["loras"])
    return f"{s.get('prompt', '')}\nNegative prompt: {s.get('negative_prompt', '')}\n{tail}"


def png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(settings, sort_keys=True))
    info.add_text("parameters", parameters_line(settings))
    return info


def png_bytes(image: Image.Image, settings: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(settings))
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, settings: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, settings))
    return path


def read_settings(source: str | Path | bytes | Image.Image) -> dict[str, Any]:
    """The settings Loom wrote into a PNG (path, bytes or an open image)."""
    image = (source if isinstance(source, Image.Image)
             else Image.open(io.BytesIO(source) if isinstance(source, bytes) else source))
    text = getattr(image, "text", None) or image.info
    if KEY not in text:
        raise ValueError("this PNG carries no Loom settings (no 'loom' text chunk); was it saved by Loom?")
    return json.loads(text[KEY])


def request_from_png(source, **inputs):
    """An ``ImageRequest`` that regenerates the image (pass ``image=``/``mask=`` for tasks that take inputs)."""
    settings = read_settings(source)
    settings["num_images"] = 1  # each PNG records its own seed
    return ImageRequest.from_settings(settings, **inputs)
