"""A 2x super-resolution network (ESPCN-style, residual over bicubic) in diffusers' model format.

``ESPCNUpscaler`` is a ``ModelMixin`` + ``ConfigMixin``, so it saves and loads with ``save_pretrained`` /
``from_pretrained`` like any diffusers component (config.json + diffusion_pytorch_model.safetensors). The demo's
weights are trained on scikit-image's bundled photos by ``scripts/train_image_demo.py``.

    up = ESPCNUpscaler.from_pretrained("loom/image/assets/upscaler-2x")
    big = upscale_image(up, pil_image)        # PIL in, PIL (2x) out
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn


class ESPCNUpscaler(ModelMixin, ConfigMixin):
    """x: [B, 3, H, W] in [0, 1] -> [B, 3, sH, sW]: bicubic upsample plus a learned sub-pixel residual."""

    @register_to_config
    def __init__(self, scale: int = 2, channels: int = 3, hidden: int = 48, mid: int = 24):
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(hidden, mid, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(mid, channels * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.config.scale
        base = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)  # [B, 3, sH, sW]
        return base + self.body(x)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [0, 1] -> PIL RGB (clamped and rounded)."""
    array = (x[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.inference_mode()
def upscale_image(model: ESPCNUpscaler, image: Image.Image) -> Image.Image:
    """Super-resolve one PIL image by the model's scale."""
    param = next(model.parameters())
    x = pil_to_tensor(image).to(param.device, param.dtype)
    return tensor_to_pil(model(x).float())
