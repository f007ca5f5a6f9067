"""Pure image helpers for the tasks: size fitting, soft masks, the outpaint canvas, tiles and their blending.

No torch and no diffusers here: numpy and PIL only, so every helper is tested exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


def fit_to_unit(image: Image.Image, unit: int) -> Image.Image:
    """RGB copy resized to the nearest multiple of ``unit`` on each side (unchanged when already a multiple)."""
    image = image.convert("RGB")
    w, h = image.size
    size = (max(unit, round(w / unit) * unit), max(unit, round(h / unit) * unit))
    return image if size == (w, h) else image.resize(size, Image.LANCZOS)


def round_size(value: int, unit: int) -> int:
    """``value`` rounded to the nearest multiple of ``unit`` (at least one unit)."""
    return max(unit, round(value / unit) * unit)


def soft_mask(mask: Image.Image, size: tuple[int, int], blur: int) -> Image.Image:
    """Mask as "L" at ``size`` with Gaussian-softened edges (white = repaint)."""
    mask = mask.convert("L").resize(size, Image.NEAREST)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def default_blur(size: tuple[int, int]) -> int:
    return max(1, min(size) // 32)


@dataclass(frozen=True, slots=True)
class Padding:
    left: int
    right: int
    top: int
    bottom: int


def outpaint_padding(size: tuple[int, int], sides: list[str], ratio: float, unit: int) -> Padding:
    """Pixels to add per side (``ratio`` of the image's side) so the canvas is a multiple of ``unit``."""
    w, h = size
    pads = {s: (round(w * ratio) if s in ("left", "right") else round(h * ratio)) if s in sides else 0
            for s in ("left", "right", "top", "bottom")}
    for axis, (a, b), length in (("x", ("left", "right"), w), ("y", ("top", "bottom"), h)):
        total = length + pads[a] + pads[b]
        extra = -total % unit
        if extra:  # the rounding goes to a chosen side of this axis (or is split), never into the original
            target = b if b in sides else a if a in sides else None
            if target is None:
                raise ValueError(f"the image's {'width' if axis == 'x' else 'height'} {length} is not a multiple of "
                                 f"{unit}; resize it or outpaint that axis too")
            pads[target] += extra
    return Padding(pads["left"], pads["right"], pads["top"], pads["bottom"])


def outpaint_canvas(image: Image.Image, pad: Padding) -> Image.Image:
    """The image with its edge pixels stretched into the new borders (what the sampler starts from)."""
    array = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.pad(array, ((pad.top, pad.bottom), (pad.left, pad.right), (0, 0)), mode="edge"))


def outpaint_masks(size: tuple[int, int], pad: Padding, ramp: int) -> tuple[Image.Image, Image.Image]:
    """(hard mask of the new borders, blend mask rising from 0 at the original's edge to 1 over ``ramp`` pixels).

    The blend mask is exactly 0 over the original region, so compositing keeps it bit for bit, and it grows smoothly
    into the new area so the seam between stretched edge pixels and generated content does not show.
    """
    w, h = size
    xs, ys = np.arange(w), np.arange(h)
    dx = np.maximum(np.maximum(pad.left - xs, xs - (w - pad.right - 1)), 0)  # [W] distance outside, per column
    dy = np.maximum(np.maximum(pad.top - ys, ys - (h - pad.bottom - 1)), 0)  # [H]
    dist = np.maximum(dx[None, :], dy[:, None]).astype(np.float32)  # [H, W]
    hard = Image.fromarray(((dist > 0) * 255).astype(np.uint8))
    blend = Image.fromarray((np.clip(dist / max(ramp, 1), 0, 1) * 255).round().astype(np.uint8))
    return hard, blend


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` between neighbours."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(length - tile) // stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def feather(tile_w: int, tile_h: int, overlap: int) -> np.ndarray:
    """[H, W] weights ramping up over ``overlap`` pixels from each edge (never 0, so lone tiles keep full weight)."""
    def ramp(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        return np.clip(np.minimum(i + 1, n - i) / max(overlap, 1), 1e-3, 1.0)

    return ramp(tile_h)[:, None] * ramp(tile_w)[None, :]


def blend_tiles(size: tuple[int, int], tiles: list[tuple[int, int, Image.Image]], overlap: int) -> Image.Image:
    """Weighted average of (x, y, tile) placed on a ``size`` canvas."""
    w, h = size
    acc = np.zeros((h, w, 3), np.float32)
    weight = np.zeros((h, w, 1), np.float32)
    for x, y, tile in tiles:
        arr = np.asarray(tile.convert("RGB"), np.float32)
        wt = feather(arr.shape[1], arr.shape[0], overlap)[..., None]
        acc[y : y + arr.shape[0], x : x + arr.shape[1]] += arr * wt
        weight[y : y + arr.shape[0], x : x + arr.shape[1]] += wt
    return Image.fromarray((acc / np.maximum(weight, 1e-8)).round().clip(0, 255).astype(np.uint8))
