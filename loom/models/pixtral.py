"""Mistral's vision-language models: Mistral Small 3.1 / 3.2 and Magistral Small (``Mistral3ForConditionalGeneration``)
and Pixtral 12B (``LlavaForConditionalGeneration`` with a Pixtral tower, mistral-community's layout): pictures at their
own resolution through the Pixtral tower.

    image --longest side down to ``longest_edge`` (1540 / 1024), sides up to multiples of patch x merge (28 / 16)-->
          Pixtral tower (2-D rotary; every picture its own patches) --> [h/p * w/p, Dv]
          Mistral 3: RMSNorm, 2 x 2 patches merged (a linear), linear-GELU-linear; Pixtral: LLaVA's projector
          --> [rows * cols, hidden]

A placeholder ``[IMG]`` becomes, as transformers' processor writes it, ``rows`` lines of ``cols`` ``[IMG]`` tokens,
each line closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` (all special tokens: nothing to merge), so an image
takes one token per 28 x 28 pixels of its resized picture (Pixtral 12B: 16 x 16) plus one a line
(``PixtralImageTokens``). Only the ``[IMG]`` tokens take the image's rows; the markers keep their embeddings. The
language model is Mistral (or any text family Loom serves), its attention causal as for text: the engine runs it as
it runs LLaVA's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loom.models.vision import (
    ImageInput,
    ImageTokens,
    PreparedImage,
    Projector,
    image_keys,
    load_whole,
    marker_ids,
    prompt_images,
    read_weights,
)


def resized(height: int, width: int, longest_edge: int, patch: int) -> tuple[int, int]:
    """The (height, width) the Pixtral processor resizes a picture to: scaled down (floor) to fit ``longest_edge``,
    then each side up to a multiple of ``patch`` (transformers' ``get_resize_output_image_size``)."""
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(np.floor(height / ratio)), int(np.floor(width / ratio))
    return ((height - 1) // patch + 1) * patch, ((width - 1) // patch + 1) * patch


@dataclass(frozen=True, slots=True)
class PixtralImageTokens(ImageTokens):
    """How a Pixtral picture sits in a prompt (plain data: the server expands placeholders with it)."""

    break_id: int = 0
    end_id: int = 0
    longest_edge: int = 0
    patch: int = 0
    """Pixels a side of one image token: the tower's patch times the merge (Mistral 3: 14 x 2)."""

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of image tokens of a ``width`` x ``height`` picture; a ValueError for one so thin that
        its short side scales down to nothing (transformers fails on it too)."""
        h, w = resized(height, width, self.longest_edge, self.patch)
        if not h or not w:
            raise ValueError(f"a {width}x{height} picture scales to {w}x{h} pixels at a longest side of "
                             f"{self.longest_edge}: too thin for this model; crop or pad it")
        return h // self.patch, w // self.patch

    def count(self, width: int, height: int, num_images: int = 1) -> int:
        rows, cols = self.grid(width, height)
        return rows * cols

    def expansion(self, width: int, height: int, num_images: int = 1) -> list[int]:
        rows, cols = self.grid(width, height)
        out = ([self.token_id] * cols + [self.break_id]) * rows
        out[-1] = self.end_id
        return out

    def describe(self) -> str:
        return f"a token per {self.patch} x {self.patch} pixels (longest side {self.longest_edge})"

    def place(self, token_ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """As ``ImageTokens.place``, except that a prompt holding ``[IMG_END]`` is taken as expanded already (a
        one-token picture's expansion, ``[IMG][IMG_END]``, holds one ``[IMG]``, as the placeholder does: the server's
        expansion was expanded again by the engine) and each picture's tokens are checked to be its layout."""
        if self.end_id not in token_ids:
            return ImageTokens.place(self, token_ids, sizes)
        at = 0
        for k, (width, height) in enumerate(sizes):
            want = self.expansion(width, height)
            start = token_ids.index(self.token_id, at) if self.token_id in token_ids[at:] else len(token_ids)
            if token_ids[start : start + len(want)] != want:
                rows, cols = self.grid(width, height)
                raise ValueError(f"the prompt's expanded picture {k + 1} is not the layout of a {width}x{height} "
                                 f"picture ({rows} lines of {cols} [IMG], each closed by [IMG_BREAK], the last by "
                                 "[IMG_END]): put one [IMG] per picture and let the engine expand it")
            at = start + len(want)
        return token_ids


class PixtralImageProcessor:
    """Pixtral's image preprocessing without its tower (the folder's processor on its PIL backend, aligned to the
    merged patch as transformers' ``PixtralProcessor`` asks it): PIL images -> ``PreparedImage`` with the resized
    picture [1, 3, h, w] and ``grid`` (h, w)."""

    def __init__(self, folder: str | Path, hf_config):
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        self.processor = PixtralImageProcessorPil.from_pretrained(str(folder))
        vision = hf_config.vision_config
        self.patch = int(vision.patch_size) * int(getattr(hf_config, "spatial_merge_size", 1) or 1)
        self.longest_edge = int(self.processor.size["longest_edge"])
        self.anyres = self.onevision = False

    def check(self, image: PreparedImage, several: bool = False) -> None:
        """A ValueError unless ``image`` holds the picture resized as this processor resizes its size."""
        h, w = resized(image.height, image.width, self.longest_edge, self.patch)
        if tuple(image.pixels.shape) != (1, 3, h, w) or image.grid != (h, w):
            raise ValueError(f"a prepared image of {image.width}x{image.height} has pixels "
                             f"{tuple(image.pixels.shape)}; this model's processor makes {(1, 3, h, w)}")

    def prepare(self, images: list, several: bool = False) -> list[PreparedImage]:
        patch = {"height": self.patch, "width": self.patch}
        out = []
        for image in images:  # one at a time: a batch is padded to its largest picture
            values = self.processor(images=[image.convert("RGB")], patch_size=patch, return_tensors="pt")
            h, w = (int(v) for v in values["image_sizes"][0])
            pixels = values["pixel_values"][:, :, :h, :w].float().clone()
            out.append(PreparedImage.of(pixels, image, (h, w)))
        return out


class PixtralVisionEncoder:
    """Images -> rows of input embeddings for a Mistral 3 or Pixtral checkpoint (its tower, its projector and its
    image processor; the tokenizer's line markers)."""

    def __init__(self, folder: str | Path, hf_config, tokenizer, dtype: torch.dtype, device: torch.device,
                 load: bool = True):
        from transformers import AutoModel  # local: transformers

        self.mistral3 = hf_config.architectures[0] == "Mistral3ForConditionalGeneration"
        self.images = PixtralImageProcessor(folder, hf_config)
        self.anyres = self.onevision = False
        layers = hf_config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        if self.mistral3 and len(self.feature_layers) != 1:  # its norm and patch merger take one layer's width
            raise ValueError(f"{folder}: Mistral 3's projector takes one vision_feature_layer, got {layers}")
        if getattr(hf_config, "vision_feature_select_strategy", "full") != "full":
            raise ValueError(f"{folder}: a Pixtral tower's rows are all patches (vision_feature_select_strategy "
                             f"'full'), got {hf_config.vision_feature_select_strategy!r}")
        ids = marker_ids(tokenizer, ["[IMG_BREAK]", "[IMG_END]"], folder, "Pixtral")
        token_id = getattr(hf_config, "image_token_id", None)
        token_id = int(token_id if token_id is not None else hf_config.image_token_index)
        self.tokens = PixtralImageTokens(token_id, 0, break_id=ids[0], end_id=ids[1],
                                         longest_edge=self.images.longest_edge, patch=self.images.patch)
        self.tower = AutoModel.from_config(hf_config.vision_config).eval()
        if self.mistral3:
            from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

            self.projector = Mistral3MultiModalProjector(hf_config).eval()
        else:
            self.projector = Projector(hf_config.vision_config.hidden_size * len(self.feature_layers),
                                       hf_config.text_config.hidden_size, hf_config.projector_hidden_act,
                                       getattr(hf_config, "multimodal_projector_bias", True)).eval()
        if load:
            parts = read_weights(Path(folder), ("vision_tower.", "multi_modal_projector."))
            load_whole(self.tower, parts["vision_tower."], Path(folder), "vision tower")
            load_whole(self.projector, parts["multi_modal_projector."], Path(folder), "multi_modal_projector")
        self.tower.to(device=device, dtype=dtype)
        self.projector.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device

    @torch.inference_mode()
    def embed(self, images: list[PreparedImage]) -> torch.Tensor:
        """The images' rows one after another: each picture through the tower on its own (transformers runs a batch
        as one sequence under a block-diagonal mask, whose memory grows with the square of all the pictures'
        patches: 4.7 GB in bfloat16 for four of Mistral 3's largest), then the projector over them all."""
        features = []
        for image in images:
            out = self.tower(image.pixels.to(device=self.device, dtype=self.dtype),
                             image_sizes=torch.tensor([image.grid]), output_hidden_states=True)
            features.append(torch.cat([out.hidden_states[layer] for layer in self.feature_layers], dim=-1)[0])
        features = torch.cat(features)
        if self.mistral3:
            return self.projector(features, torch.tensor([image.grid for image in images]))
        return self.projector(features)

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows and cache keys of a prompt's ``images`` (PIL images or ``PreparedImage``, in order), whose
        placeholders ``token_ids`` already holds expanded; a ValueError when the counts disagree."""
        positions, prepared, counts = prompt_images(token_ids, images, self.tokens, self.images)
        return ImageInput(positions, prepared, image_keys(positions, prepared, counts), self.embed)
