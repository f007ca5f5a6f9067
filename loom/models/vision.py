"""Vision-language models of the LLaVA family (``LlavaForConditionalGeneration``: LLaVA-1.5, BakLLaVA, LLaVA-Interleave
and other checkpoints in llava-hf's layout): an image becomes rows of the language model's input embeddings.

    image --image processor--> pixels [3, H, W] --vision tower--> hidden states of one layer [P, Dv]
          --(the CLS row dropped, "default" strategy)--> [N, Dv] --projector (linear, act, linear)--> [N, D]

The prompt holds N copies of the image token per image (``expand_image_tokens``: one placeholder in the text becomes
N); the engine writes the image's rows over those tokens' embeddings before the first layer (``ImageInput``), so the
language model, its paged KV cache, chunked prefill and prefix cache run as for text. The tower is transformers' own
module (CLIP or SigLIP, built from the config; it runs once per image), the language model is Loom's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration",)
IMAGE_TOWERS = ("clip_vision_model", "siglip_vision_model")
_KEY_BITS = (1 << 62) - 1


def is_multimodal(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and archs[0] in MULTIMODAL_ARCHITECTURES


def language_config(hf_config):
    """The language model's config: a vision-language config's ``text_config``, named by its architecture (which
    llava configs leave out), or the config itself."""
    if not is_multimodal(hf_config):
        return hf_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # local: transformers

    text = hf_config.text_config
    if not getattr(text, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
        text.architectures = [arch or f"{text.model_type} (text model)"]
    return text


def language_weight_name(name: str) -> str | None:
    """A vision-language checkpoint's weight name as the language model's own (``model.layers.0...``), in llava-hf's
    layout (``language_model.model.*``, ``language_model.lm_head.*``) and transformers 5's (``model.language_model.*``,
    ``lm_head.*``); None for the vision tower's and the projector's."""
    for prefix, to in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                       ("model.language_model.", "model."), ("lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return to + name.removeprefix(prefix)
    return None


def image_key(pixels: torch.Tensor) -> int:
    """A 62-bit digest of an image's pixels as the model sees them: equal keys, equal image rows (the prefix cache
    hashes it in place of the image's tokens)."""
    digest = hashlib.blake2b(pixels.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_BITS or 1


def place_image_tokens(token_ids: list[int], image_token_id: int, tokens_per_image: int, num_images: int,
                       ) -> list[int]:
    """The prompt with each image's one placeholder token repeated ``tokens_per_image`` times (what the HF processor
    does to the text); placeholders already repeated are left as they are. A ValueError when the count fits neither."""
    count = token_ids.count(image_token_id)
    if count == num_images and tokens_per_image > 1:
        out: list[int] = []
        for t in token_ids:
            if t == image_token_id:
                out.extend([t] * tokens_per_image)
            else:
                out.append(t)
        return out
    if count != num_images * tokens_per_image:
        raise ValueError(f"the prompt has {count} image tokens for {num_images} images: it needs one image "
                         "placeholder per image")
    return token_ids


@dataclass(slots=True, eq=False)
class ImageInput:
    """A prompt's images as the engine runs them: prompt position ``positions[i]`` takes row ``i`` of the images'
    embeddings. The embeddings are computed when a step first needs them (``rows``) and dropped once the prompt is
    past them (``release``; a recompute after preemption encodes again), so waiting requests hold pixels only."""

    positions: np.ndarray
    """Prompt positions of the image tokens, ascending (int64)."""
    pixels: torch.Tensor
    """The processor's pixel values [images, 3, H, W], on the CPU."""
    keys: dict[int, int]
    """Prompt position -> the key the prefix cache hashes there (the position's image's ``image_key``, negated so that
    no token id equals it)."""
    encode: Callable[[torch.Tensor], torch.Tensor]
    """Pixels -> embeddings [len(positions), hidden] (``VisionEncoder.embed_flat``)."""
    embeds: torch.Tensor | None = None

    @property
    def end(self) -> int:
        """One past the last image token's position."""
        return int(self.positions[-1]) + 1 if len(self.positions) else 0

    def rows_in(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """For prompt positions [start, end): (offsets from ``start`` of the image tokens there, their rows)."""
        lo, hi = np.searchsorted(self.positions, [start, end])
        return self.positions[lo:hi] - start, np.arange(lo, hi)

    def rows(self, first: int, last: int) -> torch.Tensor:
        """Embedding rows [first, last] (encoding the images if they are not)."""
        if self.embeds is None:
            self.embeds = self.encode(self.pixels)
        return self.embeds[first : last + 1]

    def release(self) -> None:
        self.embeds = None


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
    """Images -> rows of input embeddings for a LLaVA checkpoint (its tower, projector and image processor)."""

    def __init__(self, folder: str | Path, hf_config, dtype: torch.dtype, device: torch.device,
                 load: bool = True):
        """``load``: read the weights (False: the transformers initialisation, for ``load_format="dummy"``)."""
        from transformers import AutoImageProcessor, AutoModel  # local: transformers

        vision = hf_config.vision_config
        if vision.model_type not in IMAGE_TOWERS:
            raise ValueError(f"vision tower {vision.model_type} is not supported; Loom runs {', '.join(IMAGE_TOWERS)}")
        layers = hf_config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        self.image_token_id = int(getattr(hf_config, "image_token_id", None)
                                  if getattr(hf_config, "image_token_id", None) is not None
                                  else hf_config.image_token_index)
        self.tower = AutoModel.from_config(vision).eval()
        self.projector = Projector(vision.hidden_size * len(self.feature_layers), hf_config.text_config.hidden_size,
                                   hf_config.projector_hidden_act, getattr(hf_config, "multimodal_projector_bias",
                                                                           True))
        if load:
            self._load(Path(folder))
        self.tower.to(device=device, dtype=dtype)
        self.projector.to(device=device, dtype=dtype).eval()
        self.dtype, self.device = dtype, device
        self.processor = AutoImageProcessor.from_pretrained(str(folder))
        size = vision.image_size
        self.tokens_per_image = int(self.embed(torch.zeros(1, 3, size, size))[0].shape[0])

    def _load(self, folder: Path) -> None:
        own = dict(self.tower.named_parameters()) | dict(self.tower.named_buffers())
        inner = "vision_model." if not any(n.startswith("vision_model.") for n in own) else ""
        tower, projector = {}, {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    bare = name.removeprefix("model.")
                    if bare.startswith("vision_tower."):
                        key = bare.removeprefix("vision_tower.")
                        tower[key.removeprefix(inner) if inner else key] = f.get_tensor(name)
                    elif bare.startswith("multi_modal_projector."):
                        projector[bare.removeprefix("multi_modal_projector.")] = f.get_tensor(name)
        # a checkpoint may keep tower layers past the feature layer; transformers' tower has them all, so all match
        missing = [n for n in own if n not in tower and not n.endswith("position_ids")]
        if missing:
            raise ValueError(f"{folder}: the vision tower's weights are incomplete (no {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''})")
        self.tower.load_state_dict(tower, strict=False)
        self.projector.load_state_dict(projector)

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images -> the processor's pixel values [N, 3, H, W] (float32, on the CPU)."""
        out = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return out["pixel_values"].float()

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values [N, 3, H, W] -> image rows [N, tokens_per_image, hidden] (the model's dtype and device)."""
        out = self.tower(pixels.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        hidden = [out.hidden_states[layer] for layer in self.feature_layers]
        if self.drop_cls:
            hidden = [h[:, 1:] for h in hidden]
        return self.projector(torch.cat(hidden, dim=-1))

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows and cache keys of a prompt's ``images`` (in order), whose placeholders ``token_ids`` already holds
        expanded; a ValueError when the counts disagree."""
        positions = np.flatnonzero(np.asarray(token_ids, dtype=np.int64) == self.image_token_id)
        n = self.tokens_per_image
        if len(positions) != n * len(images):
            placed = len(positions) / n
            raise ValueError(f"the prompt has {placed:g} image placeholders ({len(positions)} image tokens, "
                             f"{n} per image) for {len(images)} images: put one image token in the text per image")
        pixels = self.pixels(images)
        keys = {}
        for i in range(len(images)):
            key = -image_key(pixels[i])
            keys.update((int(p), key) for p in positions[i * n : (i + 1) * n])
        return ImageInput(positions, pixels, keys, self.embed_flat)

    def embed_flat(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values [N, 3, H, W] -> the images' rows one after another [N * tokens_per_image, hidden]."""
        return self.embed(pixels).reshape(-1, self.projector.linear_2.out_features)
