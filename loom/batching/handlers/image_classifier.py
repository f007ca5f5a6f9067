"""`image-classifier` handler: a ViT (or any AutoModelForImageClassification) from an HF folder.

A request is the raw bytes of a PNG or JPEG (or {"image": base64}); the result is the top-k labels,
[{"label": str, "score": float}, ...], k from the model option ``top_k`` (default 5).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

from loom.batching.handler import Context, Handler, ItemError

MAX_PIXELS = 40_000_000


class ImageClassifierHandler(Handler):
    def setup(self, ctx: Context) -> None:
        if not ctx.model_dir:
            raise ValueError("image-classifier needs a model folder: --serve NAME=image-classifier:/path/to/hf-folder")
        folder = Path(ctx.model_dir)
        self.model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.to(ctx.device)
        self.device = ctx.device
        self.processor = _image_processor(folder, self.model.config)
        self.top_k = max(1, min(int(ctx.options.get("top_k", 5)), self.model.config.num_labels))

    def decode(self, item: Any):
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            try:
                item = base64.b64decode(item["image"], validate=True)
            except (binascii.Error, ValueError):
                raise ItemError('"image" is not valid base64; send the PNG/JPEG bytes base64-encoded') from None
        if not isinstance(item, bytes | bytearray):
            raise ItemError('send the raw bytes of a PNG or JPEG (Content-Type: image/png) or {"image": base64}')
        try:
            image = Image.open(io.BytesIO(item))
            if image.width * image.height > MAX_PIXELS:
                raise ItemError(f"image has {image.width}x{image.height} pixels; send at most {MAX_PIXELS}", status=413)
            return image.convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise ItemError("body is not a readable PNG or JPEG image") from None

    def preprocess(self, images: list) -> Any:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]  # [B, 3, H, W]

    def inference(self, pixel_values) -> Any:
        with torch.inference_mode():
            probs = self.model(pixel_values=pixel_values.to(self.device)).logits.softmax(dim=-1)  # [B, labels]
        return probs.topk(self.top_k, dim=-1)

    def postprocess(self, outputs) -> list[list[dict]]:
        labels = self.model.config.id2label
        return [[{"label": labels[int(i)], "score": float(p)} for p, i in zip(ps, ids)]
                for ps, ids in zip(outputs.values.tolist(), outputs.indices.tolist())]


def _image_processor(folder: Path, config):
    """The folder's saved processor, else ViT's: resize to the model's size, rescale, normalise with 0.5."""
    if (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(folder)
    size = getattr(config, "image_size", 224)
    return ViTImageProcessor(size={"height": size, "width": size})
