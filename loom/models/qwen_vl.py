"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``): images at their own resolution, and a rotary embedding with three positions
(M-RoPE).

    image --resized to sides that are multiples of 28 (patch 14 x merge 2), within [min_pixels, max_pixels]-->
          patches [t * h * w, 3 * 2 * 14 * 14] (the picture twice: the temporal patch) --vision transformer
          (2-D rotary; Qwen2.5-VL: windowed attention, RMSNorm, SwiGLU)--> merged 2 x 2 --> [h/2 * w/2, hidden]

So an image takes (h / 2) * (w / 2) tokens, one per 28 x 28 pixels of the resized picture
(``QwenImageTokens.count``). The language model is Qwen2 with M-RoPE: a text token rotates every frequency by one
position (plain RoPE), an image token rotates some frequencies by its temporal position, some by its row, some by
its column (``mrope_section``), each counted from where the image starts; the text after an image goes on from that
start plus the grid's longer side, not its token count. So positions fall behind token indices after each image, and
a token past the prompt rotates by its index plus the prompt's ``rope_delta``. The engine's KV cache, chunked prefill
and prefix cache are those of any model: only the rotation differs (``loom.engine.model_runner._rope_positions``,
``loom.ops.rotary.mrope_rows``). The tower is transformers' module, built from the config; the language model is
Loom's.

Qwen3-VL cuts 16-pixel patches (a token per 32 x 32 pixels), its language model is Qwen3, and two things differ:
M-RoPE's frequencies take the temporal, height and width positions in turn rather than in runs
(``mrope_interleaved``), and the tower also hands over features of some of its inner layers (DeepStack), each added to
the image tokens' hidden states after one of the first decoder layers. ``QwenVisionEncoder.embed`` returns them beside
the input rows, one wide row per token, so the engine's image rows carry them through chunked prefill unchanged.
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
    image_keys,
    load_whole,
    prompt_images,
    read_weights,
)

TOWERS = {"qwen2_vl_vision": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
          "qwen2_5_vl_vision": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
          "qwen3_vl_vision": ("qwen3_vl", "Qwen3VLVisionModel"),
          "qwen3_vl_moe_vision": ("qwen3_vl_moe", "Qwen3VLMoeVisionModel")}
"""Vision config model type -> transformers' module (its models/ folder) and class."""


def mrope_positions(num_tokens: int, starts: list[int], grids: list[tuple[int, int, int]],
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """M-RoPE positions of a prompt of ``num_tokens`` whose k-th image's tokens start at index ``starts[k]`` and lie
    as a (temporal, rows, columns) grid ``grids[k]`` of tokens, as transformers' ``get_rope_index`` gives them.
    Returns (the position each token rotates by [num_tokens] (an image token's temporal one), the image tokens'
    (temporal, height, width) positions [image tokens, 3], the delta of the tokens after the prompt)."""
    rope = np.empty(num_tokens, dtype=np.int64)
    mrope = []
    shift, end = 0, 0
    for start, (t, h, w) in zip(starts, grids):
        rope[end:start] = np.arange(end, start) + shift
        base = start + shift
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
        mrope.append(grid + base)
        end = start + len(grid)
        rope[start:end] = grid[:, 0] + base
        shift += max(h, w) - len(grid)  # the text after an image goes on from its start plus its longer side
    rope[end:] = np.arange(end, num_tokens) + shift
    return rope, np.concatenate(mrope) if mrope else np.empty((0, 3), dtype=np.int64), shift


def merged_grid(height: int, width: int, factor: int, pixel_range: tuple[int, int]) -> tuple[int, int]:
    """The rows and columns of merged patches (tokens) of a picture once resized as Qwen2-VL's processor resizes it:
    sides multiples of ``factor`` (patch x merge size), between ``pixel_range`` pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    resized_h, resized_w = smart_resize(height, width, factor, *pixel_range)
    return resized_h // factor, resized_w // factor


@dataclass(frozen=True, slots=True)
class QwenImageTokens(ImageTokens):
    """How a Qwen2-VL picture sits in a prompt: a token per ``tile_size`` x ``tile_size`` square (patch size x merge
    size) of the picture resized to between ``pixel_range`` pixels (plain data: the server counts with it)."""

    pixel_range: tuple[int, int] = (0, 0)

    def count(self, width: int, height: int, num_images: int = 1) -> int:
        rows, cols = merged_grid(height, width, self.tile_size, self.pixel_range)
        return rows * cols

    def describe(self) -> str:
        return f"a token per {self.tile_size} x {self.tile_size} pixels"


class QwenImageProcessor:
    """Qwen2-VL's image preprocessing without its tower (the folder's image processor, run by transformers' PIL
    backend: no torchvision): PIL images -> ``PreparedImage`` with the patch grid."""

    def __init__(self, folder: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
        """``min_pixels``, ``max_pixels``: the resized picture's bounds instead of the folder's (vLLM's
        ``--mm-processor-kwargs``)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
        p = self.processor
        self.patch_size, self.merge_size, self.temporal = p.patch_size, p.merge_size, p.temporal_patch_size
        low, high = min_pixels or int(p.size["shortest_edge"]), max_pixels or int(p.size["longest_edge"])
        if low > high:
            raise ValueError(f"min_pixels {low} is above max_pixels {high} (one of them from {folder})")
        p.size["shortest_edge"], p.size["longest_edge"] = low, high
        self.pixel_range = (low, high)
        self.tile_size = self.patch_size * self.merge_size
        self.anyres = self.onevision = False

    def tokens(self, token_id: int) -> QwenImageTokens:
        return QwenImageTokens(token_id, 0, tile_size=self.tile_size, pixel_range=self.pixel_range)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid (temporal, rows, columns) of a picture of this size."""
        rows, cols = merged_grid(height, width, self.tile_size, self.pixel_range)
        return 1, rows * self.merge_size, cols * self.merge_size

    def check(self, image: PreparedImage, several: bool = False) -> None:
        """A ValueError unless ``image`` has the patches this model's processor makes for its size."""
        grid = self.grid(image.height, image.width)
        want = (int(np.prod(grid)), 3 * self.temporal * self.patch_size**2)
        if image.grid != grid or tuple(image.pixels.shape) != want:
            raise ValueError(f"a prepared image of {image.width}x{image.height} has pixels "
                             f"{tuple(image.pixels.shape)} on a grid {image.grid}; this model's processor makes "
                             f"{want} on {grid}")

    def prepare(self, images: list, several: bool = False) -> list[PreparedImage]:
        out = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        values, grids = out["pixel_values"].float(), out["image_grid_thw"].tolist()
        prepared, at = [], 0
        for image, grid in zip(images, grids):
            n = int(np.prod(grid))
            pixels = values[at : at + n].clone()
            at += n
            prepared.append(PreparedImage.of(pixels, image, tuple(grid)))
        return prepared


class QwenVisionEncoder:
    """Images -> rows of input embeddings, and the prompt's M-RoPE positions, for a Qwen2-VL, Qwen2.5-VL or Qwen3-VL
    checkpoint (its vision transformer with the patch merger, and its image processor)."""

    def __init__(self, folder: str | Path, hf_config, dtype: torch.dtype, device: torch.device,
                 load: bool = True, resize=None):
        """``load``: read the weights (False: the transformers initialisation, for ``load_format="dummy"``);
        ``resize``: ``loom.engine.config.ImageResize`` bounds instead of the folder's."""
        import importlib

        vision = hf_config.vision_config
        if vision.model_type not in TOWERS:
            raise ValueError(f"vision tower {vision.model_type} is not supported; Loom runs {', '.join(TOWERS)}")
        self.images = QwenImageProcessor(folder, getattr(resize, "min_pixels", None),
                                         getattr(resize, "max_pixels", None))
        self.anyres = self.onevision = False
        if (self.images.patch_size, self.images.merge_size) != (vision.patch_size, vision.spatial_merge_size):
            raise ValueError(f"{folder}: the image processor cuts {self.images.patch_size}-pixel patches merged "
                             f"{self.images.merge_size} x {self.images.merge_size}, the tower "
                             f"{vision.patch_size} and {vision.spatial_merge_size}: they must agree")
        self.tokens = self.images.tokens(int(hf_config.image_token_id))
        folder_name, cls = TOWERS[vision.model_type]
        module = importlib.import_module(f"transformers.models.{folder_name}.modeling_{folder_name}")
        self.tower = getattr(module, cls)._from_config(vision).eval()
        if load:
            self._load(Path(folder))
        self.tower.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device

    def _load(self, folder: Path) -> None:
        load_whole(self.tower, read_weights(folder, ("visual.",))["visual."], folder, "vision tower")

    @torch.inference_mode()
    def embed(self, images: list[PreparedImage]) -> torch.Tensor:
        """The images' rows one after another [sum of ``tokens.count``, hidden]: all the patches through the tower
        at once (its attention keeps each image to itself). Qwen3-VL: [..., (1 + DeepStack layers) * hidden], the
        input rows then each DeepStack feature (``LlamaModel.forward`` splits them)."""
        pixels = torch.cat([image.pixels for image in images]).to(device=self.device, dtype=self.dtype)
        grids = torch.tensor([image.grid for image in images], device=self.device)
        out = self.tower(pixels, grid_thw=grids)
        deepstack = getattr(out, "deepstack_features", None) or []
        return torch.cat([out.pooler_output, *deepstack], dim=-1) if deepstack else out.pooler_output

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows, cache keys and M-RoPE positions of a prompt's ``images`` (PIL images or ``PreparedImage``, in
        order), whose placeholders ``token_ids`` already holds expanded; a ValueError when the counts disagree."""
        positions, prepared, counts = prompt_images(token_ids, images, self.tokens, self.images)
        starts, grids, at = [], [], 0
        for image, n in zip(prepared, counts):
            run = positions[at : at + n]
            if run[-1] - run[0] != n - 1:
                raise ValueError("an image's tokens must stand together in the prompt (one run of "
                                 f"{n} for a {image.width}x{image.height} picture)")
            _, rows, cols = image.grid
            starts.append(int(run[0]))
            grids.append((image.grid[0], rows // self.images.merge_size, cols // self.images.merge_size))
            at += n
        rope, mrope, delta = mrope_positions(len(token_ids), starts, grids)
        return ImageInput(positions, prepared, image_keys(positions, prepared, counts), self.embed, rope=rope,
                          mrope=mrope, rope_delta=delta)
