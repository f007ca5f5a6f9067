"""Which vision-language implementation a checkpoint takes: the LLaVA family's (``loom.models.vision``), Qwen2-VL's
(``loom.models.qwen_vl``), Idefics3's (``loom.models.idefics3``), Gemma 3's (``loom.models.gemma3_vision``) or
Pixtral's (``loom.models.pixtral``: Mistral 3, Pixtral 12B), for the image encoder the engine runs and the
preprocessing the server runs."""

from __future__ import annotations

from pathlib import Path

import torch

from loom.models.gemma3_vision import Gemma3ImageProcessor, Gemma3VisionEncoder
from loom.models.idefics3 import FAMILIES as IDEFICS_FAMILIES
from loom.models.idefics3 import IdeficsImageProcessor, IdeficsVisionEncoder
from loom.models.pixtral import PixtralImageProcessor, PixtralVisionEncoder
from loom.models.qwen_vl import QwenImageProcessor, QwenVisionEncoder
from loom.models.vision import QWEN_VL_ARCHITECTURES, ImageProcessor, VisionEncoder

GEMMA3 = "Gemma3ForConditionalGeneration"


def is_pixtral(hf_config) -> bool:
    """Mistral 3, or a LLaVA checkpoint on a Pixtral tower (Pixtral 12B)."""
    return (hf_config.architectures[0] == "Mistral3ForConditionalGeneration"
            or getattr(hf_config.vision_config, "model_type", None) == "pixtral")


Encoder = VisionEncoder | QwenVisionEncoder | IdeficsVisionEncoder | Gemma3VisionEncoder | PixtralVisionEncoder
"""A vision-language model's image encoder, whichever family."""
Preprocessor = (ImageProcessor | QwenImageProcessor | IdeficsImageProcessor | Gemma3ImageProcessor
                | PixtralImageProcessor)
"""A vision-language model's image preprocessing alone, whichever family."""


def vision_encoder(folder: str | Path, hf_config, tokenizer, dtype: torch.dtype, device: torch.device,
                   load: bool = True, resize=None) -> Encoder:
    """The checkpoint's image encoder. ``resize``: ``loom.engine.config.ImageResize`` (Qwen2-VL only; the others
    refuse it: their pictures take the tower's tiles)."""
    if hf_config.architectures[0] in QWEN_VL_ARCHITECTURES:
        return QwenVisionEncoder(folder, hf_config, dtype, device, load, resize)
    if resize is not None:
        raise ValueError("mm_processor_kwargs (min_pixels, max_pixels) sizes Qwen2-VL's pictures; this model "
                         "resizes to its tower's tiles: drop --mm-processor-kwargs")
    if hf_config.architectures[0] in IDEFICS_FAMILIES:
        return IdeficsVisionEncoder(folder, hf_config, tokenizer, dtype, device, load)
    if hf_config.architectures[0] == GEMMA3:
        return Gemma3VisionEncoder(folder, hf_config, tokenizer, dtype, device, load)
    if is_pixtral(hf_config):
        return PixtralVisionEncoder(folder, hf_config, tokenizer, dtype, device, load)
    return VisionEncoder(folder, hf_config, dtype, device, load)


def image_processor(folder: str | Path, resize=None) -> Preprocessor:
    """The checkpoint's image preprocessing alone (what the server runs on its media threads), sized as the engine's
    encoder is."""
    from transformers import AutoConfig  # local: transformers

    hf_config = AutoConfig.from_pretrained(str(folder))
    if hf_config.architectures[0] in QWEN_VL_ARCHITECTURES:
        return QwenImageProcessor(folder, getattr(resize, "min_pixels", None), getattr(resize, "max_pixels", None))
    if hf_config.architectures[0] in IDEFICS_FAMILIES:
        return IdeficsImageProcessor(folder, hf_config.architectures[0])
    if hf_config.architectures[0] == GEMMA3:
        return Gemma3ImageProcessor(folder, hf_config)
    if is_pixtral(hf_config):
        return PixtralImageProcessor(folder, hf_config)
    return ImageProcessor(folder, hf_config)
