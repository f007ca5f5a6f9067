"""Idefics3 (``Idefics3ForConditionalGeneration``: SmolVLM-256M / 500M / 2B-Instruct, Idefics3-8B) and SmolVLM2
(``SmolVLMForConditionalGeneration``, pictures only): the small vision-language models people run on a CPU.

    image --longest side resized to ``size`` (SmolVLM: 2048), then to multiples of the tile (512)-->
          rows x cols tiles of 512, and the whole picture squeezed to one more tile (the "global" view)
          --SigLIP-style tower (each tile)--> [tiles, 1024 patches, Dv] --pixel shuffle (x4 channels, /4 patches)
          + linear (connector)--> [tiles, 64, hidden]

One image placeholder (``<image>`` in the prompt) becomes, as transformers' processor writes it in the text, every
tile's rows behind ``<fake_token_around_image><row_r_col_c>``, a newline after each row of tiles, then the global
view's rows behind ``<fake_token_around_image><global-img>`` and a closing ``<fake_token_around_image>``: a token
sequence, not one token repeated (``IdeficsImageTokens.expansion``), computed from the picture's size alone. The
tower and connector are transformers' modules, built from the config; the language model (Llama: SmolLM2 for
SmolVLM) is Loom's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.models.vision import (
    ImageInput,
    ImageTokens,
    PreparedImage,
    image_keys,
    load_whole,
    marker_ids,
    prompt_images,
    read_weights,
)

FAMILIES = {"Idefics3ForConditionalGeneration": ("idefics3", "Idefics3"),
            "SmolVLMForConditionalGeneration": ("smolvlm", "SmolVLM")}
"""Architecture -> transformers' model folder and class prefix (SmolVLM2's pictures are Idefics3's: the same tower,
connector, tiling and prompt; its videos are not served)."""


def _transformers_class(arch: str, kind: str, name: str):
    """transformers' ``{Prefix}{name}`` class of ``arch``'s family from its ``kind`` module (modeling, or
    image_processing_pil)."""
    import importlib

    folder, prefix = FAMILIES[arch]
    return getattr(importlib.import_module(f"transformers.models.{folder}.{kind}_{folder}"), prefix + name)


def tile_grid(height: int, width: int, longest_edge: int, tile: int, split: bool = True) -> tuple[int, int]:
    """(rows, columns) of ``tile``-pixel tiles Idefics3's processor cuts a picture into, as its preprocessing does
    (the longest side resized to ``longest_edge``, then each side up to a multiple of the tile, the shorter one
    from the aspect); (0, 0): the global view alone. (transformers' ``get_number_of_image_patches`` reckons the shorter
    side from the original size and disagrees where ``longest_edge`` is not a multiple of the tile.)"""
    if not split:
        return 0, 0
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        MAX_IMAGE_SIZE,
        _resize_output_size_rescale_to_max_len,
        _resize_output_size_scale_below_upper_bound,
    )

    height, width = _resize_output_size_rescale_to_max_len(height, width, max_len=longest_edge)
    height, width = _resize_output_size_scale_below_upper_bound(height, width, max_len=MAX_IMAGE_SIZE)
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    if height > tile or width > tile:
        return height // tile, width // tile
    return 0, 0


@dataclass(frozen=True, slots=True)
class IdeficsImageTokens(ImageTokens):
    """How an Idefics3 picture sits in a prompt (plain data: the server expands placeholders with it)."""

    seq_len: int = 0
    """Rows of one tile (64 for SmolVLM: 512-pixel tiles, 16-pixel patches, pixel shuffle by 4)."""
    fake_id: int = 0
    global_id: int = 0
    row_col_ids: tuple[tuple[int, ...], ...] = ()
    """``<row_{r+1}_col_{c+1}>``'s id at [r][c]."""
    newline: tuple[int, ...] = ()
    """The tokens of "\\n" (after each row of tiles) and of "\\n\\n" (the last row's, before the global view)."""
    double_newline: tuple[int, ...] = ()
    longest_edge: int = 0
    """The processor's ``size``: a picture's longest side is resized to this."""
    split: bool = True
    """``do_image_splitting``: tiles of ``tile_size`` plus the global view; False: the global view alone."""

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of tiles a ``width`` x ``height`` picture is cut into; (0, 0): the global view alone."""
        return tile_grid(height, width, self.longest_edge, self.tile_size, self.split)

    def count(self, width: int, height: int, num_images: int = 1) -> int:
        rows, cols = self.grid(width, height)
        return (rows * cols + 1) * self.seq_len

    def describe(self) -> str:
        return f"{self.seq_len} tokens per {self.tile_size}-pixel tile"

    def expansion(self, width: int, height: int, num_images: int = 1) -> list[int]:
        rows, cols = self.grid(width, height)
        tile = [self.token_id] * self.seq_len
        out: list[int] = []
        for r in range(rows):
            for c in range(cols):
                out += [self.fake_id, self.row_col_ids[r][c], *tile]
            out += self.newline if r < rows - 1 else self.double_newline
        return out + [self.fake_id, self.global_id, *tile, self.fake_id]


class IdeficsImageProcessor:
    """Idefics3's image preprocessing without its tower (the folder's processor, transformers' PIL backend): PIL
    images -> ``PreparedImage`` with the tiles [rows * cols + 1, 3, S, S] and ``grid`` (rows, cols)."""

    def __init__(self, folder: str | Path, arch: str = "Idefics3ForConditionalGeneration"):
        self.processor = _transformers_class(arch, "image_processing_pil", "ImageProcessorPil").from_pretrained(
            str(folder))
        self.tile_size = int(self.processor.max_image_size["longest_edge"])
        self.longest_edge = int(self.processor.size["longest_edge"])
        self.split = bool(self.processor.do_image_splitting)
        self.anyres = self.onevision = False

    def check(self, image: PreparedImage, several: bool = False) -> None:
        """A ValueError unless ``image`` has the grid of tiles this processor makes for its size."""
        rows, cols = image.grid or (-1, -1)
        want = (rows * cols + 1, 3, self.tile_size, self.tile_size)
        grid = tile_grid(image.height, image.width, self.longest_edge, self.tile_size, self.split)
        if tuple(image.pixels.shape) != want or grid != (rows, cols):
            raise ValueError(f"a prepared image of {image.width}x{image.height} has pixels "
                             f"{tuple(image.pixels.shape)} on a {rows} x {cols} grid; this model's processor makes "
                             "another")

    def prepare(self, images: list, several: bool = False) -> list[PreparedImage]:
        out = self.processor(images=[[image.convert("RGB") for image in images]], return_tensors="pt",
                             return_row_col_info=True)
        values = out["pixel_values"][0].float()
        prepared, at = [], 0
        for image, rows, cols in zip(images, out["rows"][0], out["cols"][0]):
            n = rows * cols + 1
            pixels = values[at : at + n].clone()
            at += n
            prepared.append(PreparedImage.of(pixels, image, (rows, cols)))
        return prepared


class IdeficsVisionEncoder:
    """Images -> rows of input embeddings for an Idefics3 checkpoint (its vision transformer, its connector and its
    image processor; the tokenizer's tile tags)."""

    def __init__(self, folder: str | Path, hf_config, tokenizer, dtype: torch.dtype, device: torch.device,
                 load: bool = True):
        arch = hf_config.architectures[0]
        vision = hf_config.vision_config
        self.images = IdeficsImageProcessor(folder, arch)
        self.anyres = self.onevision = False
        if self.images.tile_size != vision.image_size:
            raise ValueError(f"{folder}: the image processor cuts {self.images.tile_size}-pixel tiles but the tower "
                             f"takes {vision.image_size}: they must agree (max_image_size)")
        seq_len = int((vision.image_size // vision.patch_size) ** 2 / hf_config.scale_factor**2)
        names = ["<fake_token_around_image>", "<global-img>"]
        names += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        ids = marker_ids(tokenizer, names, folder, "Idefics3")
        self.tokens = IdeficsImageTokens(
            int(hf_config.image_token_id), seq_len, tile_size=self.images.tile_size, seq_len=seq_len,
            fake_id=ids[0], global_id=ids[1], row_col_ids=tuple(tuple(ids[2 + 6 * r : 8 + 6 * r]) for r in range(6)),
            newline=tuple(tokenizer.encode("\n", add_special_tokens=False)),
            double_newline=tuple(tokenizer.encode("\n\n", add_special_tokens=False)),
            longest_edge=self.images.longest_edge, split=self.images.split)
        self.patches = vision.image_size // vision.patch_size
        self.tower = _transformers_class(arch, "modeling", "VisionTransformer")._from_config(vision).eval()
        self.connector = _transformers_class(arch, "modeling", "Connector")(hf_config).eval()
        if load:
            self._load(Path(folder))
        self.tower.to(device=device, dtype=dtype)
        self.connector.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device

    def _load(self, folder: Path) -> None:
        parts = read_weights(folder, ("vision_model.", "connector."))
        load_whole(self.tower, parts["vision_model."], folder, "vision_model")
        load_whole(self.connector, parts["connector."], folder, "connector")

    @torch.inference_mode()
    def embed(self, images: list[PreparedImage]) -> torch.Tensor:
        """The images' rows one after another: every tile through the tower at once (none is padded: each is the
        tower's size), pixel-shuffled and projected by the connector, in the prompt's order (tiles by row, then the
        global view)."""
        tiles = torch.cat([image.pixels for image in images]).to(device=self.device, dtype=self.dtype)
        mask = torch.ones(len(tiles), self.patches, self.patches, dtype=torch.bool, device=self.device)
        hidden = self.tower(pixel_values=tiles, patch_attention_mask=mask).last_hidden_state
        return self.connector(hidden).flatten(0, 1)

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows and cache keys of a prompt's ``images`` (PIL images or ``PreparedImage``, in order), whose
        placeholders ``token_ids`` already holds expanded; a ValueError when the counts disagree."""
        positions, prepared, counts = prompt_images(token_ids, images, self.tokens, self.images)
        return ImageInput(positions, prepared, image_keys(positions, prepared, counts), self.embed)
