"""What one image job may ask of a server, checked before the job is queued (``loom serve --image-max-pixels``).

Pure Python (no torch, no PIL): the serve plugin imports it to build its flags.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_STEPS = 200
MAX_IMAGES = 8


class TooLarge(ValueError):
    """A result or input image over the pixel limit (HTTP 413)."""


@dataclass(slots=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Most pixels (width x height) of a result image and of an input image (4194304 = 2048 x 2048)."""
    max_steps: int = MAX_STEPS
    """Most sampler steps per image."""
    max_images: int = MAX_IMAGES
    """Most images per job."""

    def __post_init__(self) -> None:
        if self.max_pixels < 64:
            raise ValueError(f"max_pixels must be >= 64, got {self.max_pixels}")
        if not 1 <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be in 1..{MAX_STEPS}, got {self.max_steps}")
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ValueError(f"max_images must be in 1..{MAX_IMAGES}, got {self.max_images}")

    def apply(self, request) -> None:
        """Fit an ``ImageRequest`` to this server: a preset's steps are capped at ``max_steps``; explicit steps or
        images beyond the limits are a ValueError."""
        if request.steps is None and request.resolved()[0] > self.max_steps:
            request.steps = self.max_steps
        if request.steps is not None and request.steps > self.max_steps:
            raise ValueError(f"steps must be at most {self.max_steps} on this server, got {request.steps}")
        if request.num_images > self.max_images:
            raise ValueError(f"at most {self.max_images} images per job on this server, got {request.num_images}")


def check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    """TooLarge unless ``size`` (width, height) is within ``max_pixels``."""
    w, h = size
    if w * h > max_pixels:
        raise TooLarge(f"{what} would be {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels} "
                       "(--image-max-pixels); use a smaller size")
