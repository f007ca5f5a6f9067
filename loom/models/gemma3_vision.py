"""Gemma 3's vision-language models (``Gemma3ForConditionalGeneration``: Gemma 3 4B / 12B / 27B, instruction-tuned and
pretrained, in the hub's layout and transformers 5's).

    image --resized to the tower's square (896 px)--> SigLIP tower --> [4096 patches, Dv] --average-pooled 4 x 4-->
          [256, Dv] --RMSNorm (1 + w), one matmul (the projector)--> [256, hidden]

An image placeholder (``<start_of_image>``, as the chat template writes it) becomes, as transformers' processor writes
it in the text, ``\\n\\n<start_of_image>``, 256 ``<image_soft_token>``, ``<end_of_image>\\n\\n``. The engine expands
token ids, not text, so the inserted newlines are merged with the prompt's newlines beside them into the tokens the
tokenizer makes of the whole run, as it would from the text (``Gemma3ImageTokens.place``; vLLM does the same).

What sets Gemma 3 apart from the other vision models is its attention: an image's tokens see each other both ways,
the whole image, in every layer (local and global), while everything else stays causal. Each image's span is handed
to the paged attention (``ImageInput.spans`` -> ``AttentionMetadata.visible_through``: the last position a query
sees, its span's last inside one), and the scheduler never cuts a span between two prefill chunks, so every query of
an image meets every key of it in the step that computes them. A prefix-cache hit that ends inside an image is
exact: the cached keys were computed with the whole (same) image in view. The tower and projector are transformers'
modules, built from the config; the language model (Gemma 3's text model) is Loom's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loom.models.vision import (
    ImageInput,
    ImageProcessor,
    ImageTokens,
    image_keys,
    load_whole,
    marker_ids,
    prompt_images,
    read_weights,
)

MAX_NEWLINES = 32
"""Newline runs up to this long are re-encoded exactly where an image's newlines meet the prompt's."""


@dataclass(frozen=True, slots=True)
class Gemma3ImageTokens(ImageTokens):
    """How a Gemma 3 picture sits in a prompt (plain data: the server expands placeholders with it)."""

    end_id: int = 0
    """``<end_of_image>``."""
    newline_runs: tuple[tuple[int, ...], ...] = ()
    """The tokenizer's tokens for k newlines, k = 0 .. MAX_NEWLINES."""
    newline_ids: frozenset[int] = frozenset()
    """Tokens made of newlines only (each one's count in ``newline_counts``)."""
    newline_counts: tuple[tuple[int, int], ...] = ()

    def describe(self) -> str:
        return f"{self.tile_rows} tokens per image, attended both ways"

    def expansion(self, width: int, height: int, num_images: int = 1) -> list[int]:
        """One picture's tokens as the processor writes them (the newlines around them, before any merging)."""
        return [*self.newline_runs[2], self.placeholder_id, *[self.token_id] * self.tile_rows, self.end_id,
                *self.newline_runs[2]]

    def _newlines(self, count: int) -> list[int]:
        out = []
        if count > MAX_NEWLINES:  # longer runs than the table: the longest newline token while past it, then the rest
            longest, size = max(self.newline_counts, key=lambda item: item[1])
            while count > MAX_NEWLINES:
                out.append(longest)
                count -= size
        return out + list(self.newline_runs[count])

    def place(self, token_ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """The prompt with each ``<start_of_image>`` expanded, the inserted ``\\n\\n`` and the prompt's newlines next
        to them merged as the tokenizer would merge the text; a prompt that holds image tokens already is taken as
        expanded when each ``<start_of_image>`` in it is followed by an image token. A ValueError when the placeholders
        are not one per image."""
        pairs = zip(token_ids, token_ids[1:])
        if self.token_id in token_ids and all(b == self.token_id for a, b in pairs if a == self.placeholder_id):
            return token_ids  # expanded already (image tokens typed as text beside a bare placeholder are not)
        found = token_ids.count(self.placeholder_id)
        if found != len(sizes):
            raise ValueError(f"the prompt has {found} image placeholders (<start_of_image>) for {len(sizes)} images: "
                             "put one in the text per image")
        counts = dict(self.newline_counts)
        out: list[int] = []
        pending = 0  # newlines after the last image, merged with the prompt's that follow
        for t in token_ids:
            if pending and t in self.newline_ids:
                pending += counts[t]
                continue
            if t == self.placeholder_id:
                before = 2
                while out and out[-1] in self.newline_ids and not pending:
                    before += counts[out.pop()]
                out += self._newlines(before + pending)
                out += [self.placeholder_id, *[self.token_id] * self.tile_rows, self.end_id]
                pending = 2
                continue
            if pending:
                out += self._newlines(pending)
                pending = 0
            out.append(t)
        return out + self._newlines(pending)


def newline_tokens(tokenizer) -> dict:
    """``Gemma3ImageTokens``' newline fields from the tokenizer."""
    runs = tuple(tuple(tokenizer.encode("\n" * k, add_special_tokens=False)) for k in range(MAX_NEWLINES + 1))
    counts = {}
    for run in runs:
        for t in run:
            text = tokenizer.decode([t])
            if text and set(text) == {"\n"}:
                counts[t] = len(text)
    return dict(newline_runs=runs, newline_ids=frozenset(counts), newline_counts=tuple(sorted(counts.items())))


def image_spans(positions: np.ndarray) -> np.ndarray:
    """[spans, 2] (start, end) of the runs of consecutive image-token positions: what transformers' Gemma 3 mask
    attends both ways (a token of one run sees the whole run)."""
    if not len(positions):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    return np.stack([positions[starts], positions[ends - 1] + 1], axis=1).astype(np.int64)


class Gemma3ImageProcessor(ImageProcessor):
    """Gemma 3's image preprocessing (the folder's processor: a resize to the tower's square); pan-and-scan crops are
    refused where the folder turns them on."""

    def __init__(self, folder: str | Path, hf_config=None):
        super().__init__(folder, hf_config)
        if getattr(self.processor, "do_pan_and_scan", False):
            raise ValueError(f"{folder}: the image processor has do_pan_and_scan on; Loom runs Gemma 3's pictures "
                             "whole (set do_pan_and_scan to false in preprocessor_config.json)")


class Gemma3VisionEncoder:
    """Images -> rows of input embeddings for a Gemma 3 checkpoint (its SigLIP tower, its projector and its image
    processor; the tokenizer's image markers and newlines)."""

    def __init__(self, folder: str | Path, hf_config, tokenizer, dtype: torch.dtype, device: torch.device,
                 load: bool = True):
        from transformers import AutoModel  # local: transformers
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        self.images = Gemma3ImageProcessor(folder, hf_config)
        self.anyres = self.onevision = False
        ids = marker_ids(tokenizer, ["<start_of_image>", "<end_of_image>"], folder, "Gemma 3")
        count = int(hf_config.mm_tokens_per_image)
        self.tokens = Gemma3ImageTokens(int(hf_config.image_token_id), count, placeholder_id=ids[0], end_id=ids[1],
                                        **newline_tokens(tokenizer))
        self.tower = AutoModel.from_config(hf_config.vision_config).eval()
        self.projector = Gemma3MultiModalProjector(hf_config).eval()
        if load:
            parts = read_weights(Path(folder), ("vision_tower.", "multi_modal_projector."))
            tower = {name.removeprefix("vision_model."): value for name, value in parts["vision_tower."].items()}
            load_whole(self.tower, tower, Path(folder), "vision tower")  # the hub's names, or transformers 5's
            load_whole(self.projector, parts["multi_modal_projector."], Path(folder), "multi_modal_projector")
        self.tower.to(device=device, dtype=dtype)
        self.projector.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device

    @torch.inference_mode()
    def embed(self, images) -> torch.Tensor:
        """The images' rows one after another [images * 256, hidden]: every picture through the tower at once,
        pooled and projected."""
        pixels = torch.cat([image.pixels for image in images]).to(device=self.device, dtype=self.dtype)
        return self.projector(self.tower(pixel_values=pixels).last_hidden_state).flatten(0, 1)

    def image_input(self, token_ids: list[int], images: list) -> ImageInput:
        """The rows, cache keys and both-ways spans of a prompt's ``images`` (PIL images or ``PreparedImage``, in
        order), whose placeholders ``token_ids`` already holds expanded; a ValueError when the counts disagree."""
        positions, prepared, counts = prompt_images(token_ids, images, self.tokens, self.images)
        return ImageInput(positions, prepared, image_keys(positions, prepared, counts), self.embed,
                          spans=image_spans(positions))
