"""Weighted and long prompts as CLIP embeddings for diffusers' ``prompt_embeds``, for SD (one encoder) and SDXL (two).

CLIP sees 77 positions, so a prompt is cut into chunks of 75 tokens; each chunk is wrapped in BOS ... EOS, padded
with the tokenizer's pad token, encoded on its own, and the chunks' hidden states are concatenated along the sequence
(the UNet's cross-attention takes any length). A token's weight (``loom.image.prompt_weights``) scales its hidden
state; then the chunk is rescaled so its mean over all positions and features is what it was before weighting.

NOTE: of the two common variants this is A1111's ("multiply, then restore the mean"), not ComfyUI's / Fooocus'
("interpolate from the empty prompt's encoding"): it needs one encoder pass per chunk instead of two and keeps the
chunk's overall scale, which the UNet was trained on. A chunk cut is made every 75 tokens, not at the last comma.

The layout of one chunk is exactly what diffusers' own tokenization gives for a prompt of up to 75 tokens, so an
unweighted short prompt encodes to the very tensor the pipeline computes itself (tested, SD and SDXL). SDXL takes the
penultimate hidden layer of each encoder, concatenated on features, and the pooled embedding of encoder 2's first
chunk (diffusers truncates a long prompt to that chunk for its pooled embedding too).

    embeds = encode_prompts(pipe, ["a (red:1.3) dress"], [""])      # kwargs for pipe(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.image.prompt_weights import is_plain, parse_weights

CHUNK = 75
"""Prompt tokens per chunk: CLIP's 77 positions less BOS and EOS."""


@dataclass(slots=True)
class WeightedTokens:
    """One prompt as chunks of 77 ids, each id with its weight (1.0 on BOS, EOS and padding)."""

    ids: list[list[int]]
    weights: list[list[float]]

    def padded(self, num_chunks: int, empty: WeightedTokens) -> WeightedTokens:
        """Extended with chunks of the empty prompt to ``num_chunks`` chunks (so a batch shares one length)."""
        extra = num_chunks - len(self.ids)
        return WeightedTokens(self.ids + empty.ids * extra, self.weights + empty.weights * extra)


def tokenize_weighted(tokenizer, text: str) -> WeightedTokens:
    """``text`` parsed for weights, tokenized segment by segment, cut into 75-token chunks of 77 ids each."""
    ids: list[int] = []
    weights: list[float] = []
    for segment, weight in parse_weights(text):
        seg = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(segment))  # no BOS/EOS, no length warning
        ids += seg
        weights += [weight] * len(seg)
    chunks = WeightedTokens([], [])
    for start in range(0, max(len(ids), 1), CHUNK):
        part, part_w = ids[start : start + CHUNK], weights[start : start + CHUNK]
        pad = CHUNK - len(part)
        chunks.ids.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        chunks.weights.append([1.0, *part_w, 1.0] + [1.0] * pad)
    return chunks


def num_tokens(tokenizer, text: str) -> int:
    """Prompt tokens of ``text`` with its weight syntax removed (BOS/EOS not counted)."""
    return sum(len(tokenizer.tokenize(segment)) for segment, _ in parse_weights(text))


def needs_embeddings(pipe, texts: list[str]) -> bool:
    """True when some text has weights or more than 75 tokens (diffusers would ignore the one, truncate the other)."""
    tokenizer = _encoders(pipe)[0][0]
    return any(not is_plain(t) or num_tokens(tokenizer, t) > CHUNK for t in texts)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden: [N, 77, D] (one row per chunk), weights: [N, 77]; weighted, then each chunk's mean restored."""
    if bool((weights == 1).all()):
        return hidden
    h = hidden.float()
    before = h.mean(dim=(1, 2), keepdim=True)  # [N, 1, 1]
    h = h * weights[..., None].to(h)
    after = h.mean(dim=(1, 2), keepdim=True)
    # NOTE: a chunk whose weighted mean is 0 (e.g. all weights 0) keeps its weighted states: no division by zero
    return (h * torch.where(after != 0, before / after, 1.0)).to(hidden.dtype)


@torch.no_grad()
def encode_chunks(encoder, tokens: list[WeightedTokens], penultimate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every prompt's chunks in one encoder call (B prompts of N chunks each).

    Returns (hidden [B, 77 * N, D], pooled [B, P] of each prompt's first chunk, or None for an encoder without a
    projection)."""
    B, N = len(tokens), len(tokens[0].ids)
    ids = torch.tensor([row for t in tokens for row in t.ids], device=encoder.device)  # [B * N, 77]
    weights = torch.tensor([row for t in tokens for row in t.weights], device=encoder.device)
    out = encoder(ids, output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out[0]  # [B * N, 77, D]
    hidden = apply_weights(hidden, weights)
    pooled = out.text_embeds.reshape(B, N, -1)[:, 0] if hasattr(out, "text_embeds") else None
    return hidden.reshape(B, N * hidden.shape[1], hidden.shape[-1]), pooled


def _encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def encode_prompt_batch(pipe, texts: list[str], num_chunks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds [B, 77 * num_chunks, D], pooled [B, P] or None) for ``texts``, every one padded to ``num_chunks``."""
    xl = is_xl(pipe)
    parts, pooled = [], None
    for tokenizer, encoder in _encoders(pipe):
        empty = tokenize_weighted(tokenizer, "")
        tokens = [tokenize_weighted(tokenizer, t).padded(num_chunks, empty) for t in texts]
        hidden, p = encode_chunks(encoder, tokens, penultimate=xl)
        parts.append(hidden)
        pooled = p if p is not None else pooled  # SDXL: encoder 2's, the last one
    return torch.cat(parts, dim=-1), pooled if xl else None


def encode_prompts(pipe, prompts: list[str], negatives: list[str]) -> dict:
    """``pipe(...)`` keyword arguments: prompt / negative embeddings (+ pooled ones for SDXL), one length for all.

    An SDXL pipeline that zeroes the unconditional input for an empty negative prompt
    (``force_zeros_for_empty_prompt``) gets no negative embeddings when no negative is given, so it zeroes them
    itself, as it does for text prompts.
    """
    xl = is_xl(pipe)
    zero_negatives = xl and not any(negatives) and pipe.config.get("force_zeros_for_empty_prompt", False)
    texts = prompts if zero_negatives else prompts + negatives
    num_chunks = max(len(tokenize_weighted(tok, t).ids) for tok, _ in _encoders(pipe) for t in texts)
    dtype = _encoders(pipe)[0][1].dtype
    embeds, pooled = encode_prompt_batch(pipe, prompts, num_chunks)
    kwargs = {"prompt_embeds": embeds.to(dtype)}
    if xl:
        kwargs["pooled_prompt_embeds"] = pooled.to(dtype)
    if not zero_negatives:
        neg, neg_pooled = encode_prompt_batch(pipe, negatives, num_chunks)
        kwargs["negative_prompt_embeds"] = neg.to(dtype)
        if xl:
            kwargs["negative_pooled_prompt_embeds"] = neg_pooled.to(dtype)
    return kwargs
