"""Vision-language models of the LLaVA family (``LlavaForConditionalGeneration``: LLaVA-1.5, BakLLaVA, LLaVA-Interleave;
``LlavaNextForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration``, AnyRes; checkpoints in
llava-hf's layout or transformers 5's), Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``loom.models.qwen_vl``), Idefics3 /
SmolVLM (``loom.models.idefics3``), Gemma 3 (``loom.models.gemma3_vision``) and Mistral 3 / Pixtral
(``loom.models.pixtral``): an image becomes rows of the language model's input embeddings.

    image --image processor--> pixels [tiles, 3, H, W] --vision tower--> hidden states of one layer [P, Dv]
          --(the CLS row dropped, "default" strategy)--> [N, Dv] --projector (linear, act, linear)--> [N, D]

The prompt holds N copies of the image token per image (``place_image_tokens``: one placeholder in the text becomes
N, ``ImageTokens.count``); the engine writes the image's rows over those tokens' embeddings before the first layer
(``ImageInput``), so the language model, its paged KV cache, chunked prefill and prefix cache run as for text. The
tower is transformers' own module (CLIP or SigLIP, built from the config; it runs once per image), the language model
is Loom's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

QWEN3_VL_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
QWEN_VL_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                         *QWEN3_VL_ARCHITECTURES)
MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                            "LlavaOnevisionForConditionalGeneration", *QWEN_VL_ARCHITECTURES,
                            "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                            "Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration")
SERVE_A_VISION_MODEL = f"serve a vision model (architectures {', '.join(MULTIMODAL_ARCHITECTURES)})"
"""The end of the refusal a text model gives a request with images."""
ANYRES_ARCHITECTURES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
IMAGE_TOWERS = ("clip_vision_model", "siglip_vision_model")
TEXT_ARCHITECTURES = {"qwen2_vl_text": "Qwen2ForCausalLM", "qwen2_5_vl_text": "Qwen2ForCausalLM",
                      "qwen3_vl_text": "Qwen3ForCausalLM", "qwen3_vl_moe_text": "Qwen3MoeForCausalLM"}
"""Text models that transformers registers under no causal-LM class: the architecture Loom runs them as."""
_KEY_BITS = (1 << 62) - 1


def is_multimodal(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and archs[0] in MULTIMODAL_ARCHITECTURES


MARKED_PLACEHOLDERS = {"<|image_pad|>": "<|vision_start|><|image_pad|><|vision_end|>"}
"""Image tokens that chat templates write between markers (Qwen2-VL's), as a prompt written by hand must hold them."""


def image_placeholder(tokenizer, token_id: int) -> str:
    """The text one picture is written as in a prompt whose template does not place it: the image token, between
    its markers where the model's template puts them (Qwen2-VL's ``<|vision_start|>...<|vision_end|>``)."""
    text = tokenizer.convert_ids_to_tokens(token_id)
    return MARKED_PLACEHOLDERS.get(text, text)


def language_config(hf_config):
    """The language model's config: a vision-language config's ``text_config``, named by its architecture (which
    llava configs leave out), or the config itself."""
    if not is_multimodal(hf_config):
        return hf_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # local: transformers

    text = hf_config.text_config
    if not getattr(text, "architectures", None):
        arch = TEXT_ARCHITECTURES.get(text.model_type) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
        text.architectures = [arch or f"{text.model_type} (text model)"]
    return text


_VISION_PARTS = ("vision_tower.", "multi_modal_projector.", "image_newline", "visual.", "vision_model.", "connector.")


def language_weight_name(name: str) -> str | None:
    """A vision-language checkpoint's weight name as the language model's own (``model.layers.0...``), in llava-hf's
    layout (``language_model.model.*``, ``language_model.lm_head.*``), transformers 5's (``model.language_model.*``,
    ``lm_head.*``), Qwen2-VL's (``model.*`` beside ``visual.*``) and Idefics3's (``model.text_model.*``); None for the
    vision tower's and the projector's."""
    for prefix, to in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                       ("model.language_model.", "model."), ("model.text_model.", "model."), ("lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return to + name.removeprefix(prefix)
    if name.startswith("model.") and not name.removeprefix("model.").startswith(_VISION_PARTS):
        return name
    return None


def read_weights(folder: Path, prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """A vision checkpoint's tensors under each of ``prefixes`` (after an optional ``model.``), by prefix, the prefix
    taken off: the tower's and the projector's, which the language model's loader leaves alone."""
    found: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                bare = name.removeprefix("model.")
                prefix = next((p for p in prefixes if bare.startswith(p)), None)
                if prefix is not None:
                    found[prefix][bare.removeprefix(prefix)] = f.get_tensor(name)
    return found


def load_whole(module: nn.Module, weights: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    """Load every tensor of ``module``'s state from ``weights`` (extra ones ignored); a ValueError naming ``what``
    when any is missing."""
    own = module.state_dict()
    missing = [n for n in own if n not in weights]
    if missing:
        raise ValueError(f"{folder}: the {what}'s weights are incomplete (no {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''})")
    module.load_state_dict({n: weights[n] for n in own})


def marker_ids(tokenizer, names: list[str], folder, family: str) -> list[int]:
    """The ids of a family's image markers in the tokenizer; a ValueError naming the missing ones."""
    ids = tokenizer.convert_tokens_to_ids(names)
    unknown = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"{folder}: the tokenizer lacks {family}'s image markers ({', '.join(unknown[:3])})")
    return ids


def image_key(pixels: torch.Tensor, size: tuple[int, int] = (0, 0)) -> int:
    """A 62-bit digest of an image's pixels as the model sees them (and of its size, which LLaVA-NeXT's layout reads):
    equal keys, equal image rows (the prefix cache hashes it in place of the image's tokens)."""
    digest = hashlib.blake2b(pixels.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=8,
                             key=repr(tuple(size)).encode()).digest()
    return int.from_bytes(digest, "little") & _KEY_BITS or 1


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """How a vision model's images sit in its prompts: the placeholder token, and how many of them an image becomes
    (plain data: the server and the engine process both count with it)."""

    token_id: int
    tile_rows: int
    """Rows of one tile: an image's whole count for LLaVA (576 at 336 px), the base view's for LLaVA-NeXT."""
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    """LLaVA-NeXT's AnyRes resolutions (height, width); None: one tile per image."""
    tile_size: int = 0
    patches_per_side: int = 0
    max_patches: int | None = None
    """LLaVA-OneVision (``anyres_max_N``): a grid of more than N tiles' rows is scaled down (bilinear) to about N;
    and a prompt of several images gives each one square tile. None: LLaVA-NeXT's layout."""
    placeholder_id: int | None = None
    """The token a prompt holds for a picture before expansion (Gemma 3's ``<start_of_image>``); None: ``token_id``."""

    @property
    def placeholder(self) -> int:
        return self.token_id if self.placeholder_id is None else self.placeholder_id

    def place(self, token_ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """The prompt with each picture's placeholder expanded (``place_image_tokens``), for pictures of ``sizes``
        (width, height) in order. A ValueError when the prompt fits neither them nor their expansion."""
        return place_image_tokens(token_ids, self.token_id, [self.expansion(w, h, len(sizes)) for w, h in sizes])

    def count(self, width: int, height: int, num_images: int = 1) -> int:
        """Prompt tokens of a ``width`` x ``height`` image among ``num_images`` of a prompt (transformers' processor
        expands its placeholder to as many: for LLaVA-NeXT, the base view, then the tile grid cropped to the image's
        aspect with one newline row per line; LLaVA-OneVision scales a large grid down, and in a prompt of several
        images gives each one square tile and one newline row). Other families' tokens override it
        (``loom.models.qwen_vl``, ``loom.models.idefics3``)."""
        if self.grid_pinpoints is None:
            return self.tile_rows
        if self.max_patches is not None and num_images > 1:
            return self.tile_rows + 1
        rows, cols = self.grid_rows(width, height)
        return self.tile_rows + rows * (cols + 1)  # each grid line closed by image_newline

    def expansion(self, width: int, height: int, num_images: int = 1) -> list[int]:
        """The token ids one image placeholder becomes (``place_image_tokens``): here ``count`` image tokens."""
        return [self.token_id] * self.count(width, height, num_images)

    def describe(self) -> str:
        """How pictures become tokens, for the engine's start-up log."""
        return f"{self.tile_rows} tokens per image{' tile (AnyRes)' if self.grid_pinpoints else ''}"

    def grid_rows(self, width: int, height: int) -> tuple[int, int]:
        """The rows and columns of an AnyRes image's grid features after unpadding (and OneVision's scaling)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        grid_h, grid_w = get_anyres_image_grid_shape([height, width], [list(p) for p in self.grid_pinpoints],
                                                     self.tile_size)
        side = self.patches_per_side
        rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), [height, width]).shape[1:]
        if self.max_patches is not None:
            ratio = math.sqrt(rows * cols / (self.max_patches * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols


def place_image_tokens(token_ids: list[int], image_token_id: int, counts: list[int | list[int]]) -> list[int]:
    """The prompt with the k-th image's one placeholder token replaced by what ``counts[k]`` says: an int n, the
    placeholder repeated n times (what the HF processor does to the text); a list, those token ids (Idefics3's tiles
    with their row and column tags, ``ImageTokens.expansion``). Placeholders already expanded are left as they are.
    A ValueError when the prompt fits neither."""
    expansions = [[image_token_id] * n if isinstance(n, int) else list(n) for n in counts]
    found = token_ids.count(image_token_id)
    if found == len(expansions) and any(e != [image_token_id] for e in expansions):
        out: list[int] = []
        pieces = iter(expansions)
        for t in token_ids:
            if t == image_token_id:
                out.extend(next(pieces))
            else:
                out.append(t)
        return out
    if found != sum(e.count(image_token_id) for e in expansions):
        raise ValueError(f"the prompt has {found} image tokens for {len(counts)} images: it needs one image "
                         "placeholder per image")
    return token_ids


@dataclass(slots=True, eq=False)
class ImageInput:
    """A prompt's images as the engine runs them: prompt position ``positions[i]`` takes row ``i`` of the images'
    embeddings. The embeddings are computed when a step first needs them (``rows``) and dropped once the prompt is
    past them (``release``; a recompute after preemption encodes again), so waiting requests hold pixels only."""

    positions: np.ndarray
    """Prompt positions of the image tokens, ascending (int64)."""
    pixels: list[PreparedImage]
    """The images, prepared (pixel values on the CPU)."""
    keys: dict[int, int]
    """Prompt position -> the key the prefix cache hashes there (the position's image's ``image_key``, negated so that
    no token id equals it)."""
    encode: Callable[[list], torch.Tensor]
    """Pixels -> embeddings [len(positions), hidden] (``VisionEncoder.embed``)."""
    embeds: torch.Tensor | None = None
    rope: np.ndarray | None = None
    """M-RoPE (Qwen2-VL): the position each prompt token rotates by (an image token's temporal one); None: its
    index, as for any model."""
    mrope: np.ndarray | None = None
    """M-RoPE: the image tokens' (temporal, height, width) positions [len(positions), 3]."""
    rope_delta: int = 0
    """M-RoPE: a token past the prompt rotates by its index plus this (<= 0)."""
    spans: np.ndarray | None = None
    """Prompt positions [start, end) [images, 2] of spans attended both ways (Gemma 3: each image's tokens see the
    whole image); None: causal, as for any model. A prefill chunk never cuts one (``chunk_end``)."""
    error: str | None = None
    """Why the vision tower failed on these pictures (the scheduler then leaves the request out and the engine ends
    it); None: it has not."""

    @property
    def end(self) -> int:
        """One past the last image token's position."""
        return int(self.positions[-1]) + 1 if len(self.positions) else 0

    def rows_in(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """For prompt positions [start, end): (offsets from ``start`` of the image tokens there, their rows)."""
        lo, hi = np.searchsorted(self.positions, [start, end])
        return self.positions[lo:hi] - start, np.arange(lo, hi)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk [start, end) may end so that it cuts no bidirectional span: ``end`` itself, the start
        of the span it would cut, or, for a chunk that begins inside that span (or at its start), the span's end
        (the caller checks that it fits its budget)."""
        if self.spans is None:
            return end
        i = int(np.searchsorted(self.spans[:, 1], end, side="right"))  # the first span ending past ``end``
        if i == len(self.spans) or self.spans[i, 0] >= end:
            return end
        first = int(self.spans[i, 0])
        return first if first > start else int(self.spans[i, 1])

    def visible_through(self, start: int, end: int) -> np.ndarray:
        """For prompt positions [start, end) of a chunk that cuts no span: the last position each one's query sees
        (its own, or its span's last) (``AttentionMetadata.visible_through``)."""
        out = np.arange(start, end, dtype=np.int32)
        if self.spans is not None:
            for first, last in self.spans[(self.spans[:, 1] > start) & (self.spans[:, 0] < end)].tolist():
                if last > end:
                    raise RuntimeError(f"a prefill chunk [{start}, {end}) cuts the bidirectional span "
                                       f"[{first}, {last})")
                out[max(first, start) - start : last - start] = last - 1
        return out

    def encode_all(self) -> None:
        """Encode the images (the scheduler calls it when a chunk first reaches one)."""
        if self.embeds is None:
            self.embeds = self.encode(self.pixels)

    def rows(self, first: int, last: int) -> torch.Tensor:
        """Embedding rows [first, last] (encoding the images if they are not)."""
        self.encode_all()
        return self.embeds[first : last + 1]

    def release(self) -> None:
        self.embeds = None


@dataclass(frozen=True, slots=True, eq=False)
class PreparedImage:
    """An image as the tower takes it: the processor's pixel values [tiles, 3, S, S] (float32, CPU; one tile for
    LLaVA, the base view and the AnyRes grid for LLaVA-NeXT), the picture's size and its cache key. Picklable: the
    server prepares images on its own threads and hands the engine these."""

    pixels: torch.Tensor
    height: int
    width: int
    key: int
    """``image_key`` of the pixels and size."""
    grid: tuple[int, ...] | None = None
    """Qwen2-VL: the patches' (temporal, height, width) grid (its pixels are the flattened patches [t*h*w, dims]);
    Idefics3: the tiles' (rows, columns), (0, 0) for the global view alone; Pixtral: the resized (height, width)."""

    @classmethod
    def of(cls, pixels: torch.Tensor, image, grid: tuple[int, ...] | None = None) -> PreparedImage:
        """``pixels`` (owned: a clone, not a view of a batch) prepared from the PIL ``image``, keyed by both."""
        return cls(pixels, image.height, image.width, image_key(pixels, (image.height, image.width)), grid)


class ImageProcessor:
    """A vision model's image preprocessing without its tower (the folder's HF image processor and AnyRes grid):
    PIL images -> ``PreparedImage``. Runs where a request arrives (the server's media threads; offline, the caller),
    never on the engine's loop."""

    def __init__(self, folder: str | Path, hf_config=None):
        from transformers import AutoImageProcessor  # local: transformers

        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(str(folder))
        self.anyres = hf_config.architectures[0] in ANYRES_ARCHITECTURES
        self.onevision = hf_config.architectures[0] == "LlavaOnevisionForConditionalGeneration"
        self.grid_pinpoints = [list(p) for p in hf_config.image_grid_pinpoints] if self.anyres else None
        self.tile_size = hf_config.vision_config.image_size
        self.processor = AutoImageProcessor.from_pretrained(str(folder))

    def tiles(self, height: int, width: int, several: bool = False) -> int:
        """Tiles a picture of this size is cut into (1 for LLaVA; the base view and the grid for LLaVA-NeXT; 1, padded
        to a square, for a LLaVA-OneVision picture among ``several`` of a prompt)."""
        if not self.anyres or (self.onevision and several):
            return 1
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches((height, width), self.grid_pinpoints, self.tile_size)

    def check(self, image: PreparedImage, several: bool = False) -> None:
        """A ValueError unless ``image`` has the tiles this model's processor makes for its size (``several``: in a
        prompt of more than one picture)."""
        want = (self.tiles(image.height, image.width, several), 3, self.tile_size, self.tile_size)
        if tuple(image.pixels.shape) != want:
            raise ValueError(f"a prepared image of {image.width}x{image.height} has pixels "
                             f"{tuple(image.pixels.shape)}; this model's processor makes {want}")

    def prepare(self, images: list, several: bool = False) -> list[PreparedImage]:
        """``several``: the pictures belong to a prompt of more than one (LLaVA-OneVision then pads each to a square
        and keeps that one tile, as its processor does for a sample of several images)."""
        rgb = [image.convert("RGB") for image in images]
        if self.onevision and several:  # a nested batch of two or more is what turns the processor's grids off
            group = rgb if len(rgb) > 1 else rgb * 2
            values = self.processor(images=[group], return_tensors="pt")["pixel_values"].float()
            tiles = [values[i, :1] for i in range(len(images))]
        else:
            values = self.processor(images=rgb, return_tensors="pt")["pixel_values"].float()
            if not self.anyres:
                tiles = [values[i : i + 1] for i in range(len(images))]
            else:
                tiles = [values[i, : self.tiles(image.height, image.width)] for i, image in enumerate(images)]
        return [PreparedImage.of(t.clone(), image) for t, image in zip(tiles, images)]


class Projector(nn.Module):
    """LLaVA's multi-modal projector: two linears with an activation between (``projector_hidden_act``)."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool):
        from transformers.activations import ACT2FN  # local: transformers

        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionEncoder:
    """Images -> rows of input embeddings for a LLaVA, LLaVA-NeXT or LLaVA-OneVision checkpoint (its tower, projector
    and image processor; AnyRes tiles and the row-end ``image_newline`` too)."""

    def __init__(self, folder: str | Path, hf_config, dtype: torch.dtype, device: torch.device,
                 load: bool = True):
        """``load``: read the weights (False: the transformers initialisation, for ``load_format="dummy"``)."""
        from transformers import AutoModel  # local: transformers

        vision = hf_config.vision_config
        if vision.model_type not in IMAGE_TOWERS:
            raise ValueError(f"vision tower {vision.model_type} is not supported; Loom runs {', '.join(IMAGE_TOWERS)}")
        layers = hf_config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        token_id = getattr(hf_config, "image_token_id", None)
        token_id = int(token_id if token_id is not None else hf_config.image_token_index)
        self.images = ImageProcessor(folder, hf_config)
        """The layout (AnyRes, OneVision, grid, tile size) is the processor's: one reading of the config."""
        self.anyres, self.onevision = self.images.anyres, self.images.onevision
        max_patches = (int(hf_config.vision_aspect_ratio.removeprefix("anyres_max_")) if self.onevision else None)
        self.tower = AutoModel.from_config(vision).eval()
        hidden = hf_config.text_config.hidden_size
        self.projector = Projector(vision.hidden_size * len(self.feature_layers), hidden,
                                   hf_config.projector_hidden_act, getattr(hf_config, "multimodal_projector_bias",
                                                                           True))
        self.image_newline = torch.zeros(hidden) if self.anyres else None
        """LLaVA-NeXT: the row closing each line of an image's tile grid."""
        if load:
            self._load(Path(folder))
        self.tower.to(device=device, dtype=dtype)
        self.projector.to(device=device, dtype=dtype).eval()
        if self.image_newline is not None:
            self.image_newline = self.image_newline.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device
        size = self.images.tile_size
        tile_rows = int(self._tiles(torch.zeros(1, 3, size, size)).shape[1])
        side = vision.image_size // vision.patch_size
        if self.anyres and tile_rows != side * side:
            raise ValueError(f"{folder}: AnyRes lays a tile's rows out as a {side} x {side} grid, but the tower "
                             f"gives {tile_rows} (vision_feature_select_strategy "
                             f"{hf_config.vision_feature_select_strategy!r} with this tower); transformers cannot run "
                             "it either")
        self.tokens = ImageTokens(token_id, tile_rows, tuple(map(tuple, self.images.grid_pinpoints or ())) or None,
                                  size, side, max_patches)

    def _load(self, folder: Path) -> None:
        own = dict(self.tower.named_parameters()) | dict(self.tower.named_buffers())
        inner = "vision_model." if not any(n.startswith("vision_model.") for n in own) else ""
        parts = read_weights(folder, ("vision_tower.", "multi_modal_projector.", "image_newline"))
        tower = {key.removeprefix(inner): value for key, value in parts["vision_tower."].items()}
        projector, newline = parts["multi_modal_projector."], parts["image_newline"].get("")
        # a checkpoint may keep tower layers past the feature layer; transformers' tower has them all, so all match
        missing = [n for n in own if n not in tower and not n.endswith("position_ids")]
        if self.anyres and newline is None:
            missing.append("image_newline")
        if missing:
            raise ValueError(f"{folder}: the vision tower's weights are incomplete (no {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''})")
        self.tower.load_state_dict(tower, strict=False)
        self.projector.load_state_dict(projector)
        if newline is not None:
            self.image_newline = newline.float()

    @torch.inference_mode()
    def _tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, S, S] -> their projected rows [N, rows per tile, hidden] (the model's dtype and device)."""
        out = self.tower(pixels.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        hidden = [out.hidden_states[layer] for layer in self.feature_layers]
        if self.drop_cls:
            hidden = [h[:, 1:] for h in hidden]
        return self.projector(torch.cat(hidden, dim=-1))

    @torch.inference_mode()
    def embed(self, images: list[PreparedImage]) -> torch.Tensor:
        """The images' rows one after another [sum of ``tokens.count``, hidden]: all the tiles through the tower at
        once, then each image's rows as transformers' ``LlavaNextModel.pack_image_features`` lays them out (the base
        view's rows, then the grid's unpadded rows, each line closed by ``image_newline``)."""
        base_only = self.onevision and len(images) > 1  # OneVision: several images, each one square tile
        rows = self._tiles(torch.cat([image.pixels for image in images]))
        if not self.anyres:
            return rows.flatten(0, 1)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = self.tokens.patches_per_side
        out, at = [], 0
        for image in images:
            tiles = rows[at : at + len(image.pixels)]
            at += len(image.pixels)
            if base_only:
                out += [tiles[0], self.image_newline[None]]
                continue
            size = [image.height, image.width]
            grid_h, grid_w = get_anyres_image_grid_shape(size, self.images.grid_pinpoints, self.images.tile_size)
            grid = tiles[1:].view(grid_h, grid_w, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            grid = unpad_image(grid, size)  # [hidden, H, W]
            if self.onevision:  # anyres_max_N: a grid past about N tiles' rows is scaled down, as transformers does
                height, width = self.tokens.grid_rows(image.width, image.height)
                if (height, width) != tuple(grid.shape[1:]):
                    grid = torch.nn.functional.interpolate(grid[None], [height, width], mode="bilinear")[0]
            newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
            out += [tiles[0], grid]
        return torch.cat(out)

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows and cache keys of a prompt's ``images`` (PIL images or ``PreparedImage``, in order), whose
        placeholders ``token_ids`` already holds expanded; a ValueError when the counts disagree."""
        # (a OneVision picture alone and among several: other pixels, other keys)
        positions, prepared, counts = prompt_images(token_ids, images, self.tokens, self.images)
        return ImageInput(positions, prepared, image_keys(positions, prepared, counts), self.embed)


def prompt_images(token_ids: list[int], images: list, tokens: ImageTokens, processor,
                  ) -> tuple[np.ndarray, list[PreparedImage], list[int]]:
    """A prompt's image tokens' positions, its ``images`` prepared (PIL ones through ``processor``'s ``prepare``,
    every one through its ``check``) and each one's token count; a ValueError when the prompt's image tokens are not
    the images' (their placeholders must be expanded already)."""
    positions = np.flatnonzero(np.asarray(token_ids, dtype=np.int64) == tokens.token_id)
    counts = [tokens.count(image.width, image.height, len(images)) for image in images]
    if len(positions) != sum(counts):
        raise ValueError(f"the prompt has {len(positions)} image tokens where its {len(images)} images take "
                         f"{sum(counts)}: put one image token in the text per image")
    several = len(images) > 1
    raw = [i for i, image in enumerate(images) if not isinstance(image, PreparedImage)]
    prepared = list(images)
    for i, image in zip(raw, processor.prepare([images[i] for i in raw], several) if raw else []):
        prepared[i] = image
    for image in prepared:
        processor.check(image, several)
    return positions, prepared, counts


def image_keys(positions: np.ndarray, prepared: list[PreparedImage], counts: list[int]) -> dict[int, int]:
    """Prompt position -> the key the prefix cache hashes there (``ImageInput.keys``)."""
    keys, at = {}, 0
    for image, n in zip(prepared, counts):
        keys.update((int(p), -image.key) for p in positions[at : at + n])
        at += n
    return keys
