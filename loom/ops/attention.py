"""Paged attention over a block-paged KV cache.

The cache of one layer is two tensors [num_blocks, block_size, Hkv, D]. A step's tokens are flat rows [T, ...]:
first the decodes (one query each), then the prefill chunks. Each layer writes its new K/V into the cache slots
(``slot_mapping``; ``loom.ops.layers.TorchOps.rotary_and_cache``) *before* any attention reads, so a sequence may
read blocks another sequence computes in the same step (prefix sharing). This module is the plain-PyTorch
reference; ``loom.ops.cpu_kernels`` and ``loom.ops.triton`` provide kernels that must match it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    token_start: int
    token_end: int
    """Rows [token_start, token_end) of the flat batch."""
    start_pos: int
    """Position in its sequence of the chunk's first token (> 0 after a cache hit or an earlier chunk)."""
    block_table: torch.Tensor | None
    """[num_blocks] long, covering the chunk's end (the reference reads it only when start_pos > 0; Triton's kernel
    reads every key through it)."""


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] long: cache slot (block * block_size + offset) of each token."""
    num_decodes: int
    decode_block_tables: torch.Tensor
    """[Bd, max_blocks] int32, padded with block 0."""
    decode_seq_lens: torch.Tensor
    """[Bd] int32: context length of each decode, the current token included."""
    prefills: list[PrefillChunk]
    block_size: int
    visible_through: torch.Tensor | None = None
    """[T] int32 over the step's rows, or None (causal): the last position each prefill row's query sees, its
    own or further where it is inside a span the model attends to both ways (a Gemma 3 image: its tokens see the whole
    image). Such a span always lies inside one chunk (the scheduler never cuts one)."""
    plans: dict = field(default_factory=dict, repr=False)
    """What is derived from this metadata once a step and reused in every layer, by its own keys: the reference's
    decode masks, Triton's prefill launch integers."""

    def decode_mask(self, window: int | None = None) -> torch.Tensor:
        """[Bd, 1, 1, max_blocks * block_size] bool, True where a key is inside the sequence — and, with a sliding
        ``window``, among its last ``window`` tokens (built once a step per window)."""
        mask = self.plans.get(("decode_mask", window))
        if mask is None:
            max_len = self.decode_block_tables.shape[1] * self.block_size
            pos = torch.arange(max_len, device=self.decode_seq_lens.device)[None, :]
            lens = self.decode_seq_lens[:, None]
            mask = pos < lens
            if window is not None:
                mask &= pos >= lens - window
            mask = self.plans[("decode_mask", window)] = mask.view(-1, 1, 1, max_len)
        return mask


DecodeFn = Callable[..., torch.Tensor]
"""``(q, k_cache, v_cache, meta, scale, window=None, softcap=None, sinks=None) -> out``:
``decode_attention_reference``'s contract."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None = None, causal: bool = False, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over [..., H, n, D] queries and [..., Hkv, L, D] keys/values (GQA); with ``softcap`` (Gemma 2) the scores
    are capped as cap * tanh(score / cap) before the mask and softmax, and with ``sinks`` [H] (gpt-oss: a learned
    logit per head) each head's softmax also counts a key of that score and no value, which SDPA can do neither of."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        n, length = scores.shape[-2:]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.float()
    if sinks is not None:  # the sink's column joins the softmax, then is dropped: the keys' weights sum below 1
        sink = sinks.float().view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.matmul(torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :-1].to(v.dtype), v)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [Bd, H, D] -> [Bd, H, D]. Gathers each sequence's blocks, masks past its length (and outside a sliding
    ``window``), SDPA with GQA (``attend``; ``sinks``: gpt-oss' per-head sink logits)."""
    bd, _, d = q.shape
    tables = meta.decode_block_tables.long()
    hkv = k_cache.shape[2]
    k = k_cache[tables].view(bd, -1, hkv, d).transpose(1, 2)  # [Bd, Hkv, L, D]
    v = v_cache[tables].view(bd, -1, hkv, d).transpose(1, 2)
    out = attend(q.unsqueeze(2), k, v, meta.decode_mask(window), scale, softcap, sinks=sinks)  # [Bd, H, 1, D]
    return out.squeeze(2)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    visible: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One chunk. q: [n, H, D], k/v: [n, Hkv, D] (this chunk's own keys) -> [n, H, D]. Causal; with a sliding
    ``window`` a query at position p sees keys p - window + 1 .. p. ``visible`` [n]: the last position each query
    sees instead of its own (``AttentionMetadata.visible_through``; the window still bounds what lies behind it).
    ``sinks`` [H]: per-head sink logits (``attend``)."""
    n, _, d = q.shape
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if chunk.start_pos == 0 and (window is None or window >= n) and visible is None:
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = attend(qh, kh, vh, None, scale, softcap, causal=True, sinks=sinks)
    else:
        ctx = chunk.start_pos + n
        hkv = k_cache.shape[2]
        if chunk.start_pos == 0:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        else:
            kh = k_cache[chunk.block_table].view(-1, hkv, d)[:ctx].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            vh = v_cache[chunk.block_table].view(-1, hkv, d)[:ctx].transpose(0, 1).unsqueeze(0)
        q_pos = torch.arange(chunk.start_pos, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= (q_pos if visible is None else visible.long()[:, None])  # [n, ctx]
        if window is not None:
            mask &= k_pos > q_pos - window
        out = attend(qh, kh, vh, mask, scale, softcap, sinks=sinks)
    return out.squeeze(0).transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_fn: DecodeFn = decode_attention_reference,
    window: int | None = None,
    softcap: float | None = None,
    prefill_fn=None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D]; this step's k/v are already in the cache. ``window``: a sliding
    window (Mistral, Phi-3, Gemma's local layers), ``softcap``: Gemma 2's score cap, ``sinks``: gpt-oss' per-head
    sink logits [H]; every backend's kernels take all three. ``prefill_fn``: a backend's attention over all prefill
    chunks in one call (``TorchOps.prefill_attention``)."""
    if not meta.prefills:
        return decode_fn(q, k_cache, v_cache, meta, scale, window, softcap, sinks=sinks)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = decode_fn(q[:nd], k_cache, v_cache, meta, scale, window, softcap, sinks=sinks)
    if prefill_fn is not None:
        return prefill_fn(q, k_cache, v_cache, meta, scale, out, window, softcap, sinks=sinks)
    for chunk in meta.prefills:
        s, e = chunk.token_start, chunk.token_end
        out[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache, chunk, scale, window, softcap,
                                     _chunk_visible(meta, chunk), sinks)
    return out


def _chunk_visible(meta: AttentionMetadata, chunk: PrefillChunk) -> torch.Tensor | None:
    """The chunk's rows of ``meta.visible_through``, or None where none of them sees past itself (the chunk keeps
    the causal path); decided once a step per chunk."""
    if meta.visible_through is None:
        return None
    key = ("visible", chunk.token_start)
    if key not in meta.plans:
        rows = meta.visible_through[chunk.token_start : chunk.token_end]
        own = torch.arange(chunk.start_pos, chunk.start_pos + len(rows), device=rows.device)
        meta.plans[key] = rows if bool((rows != own).any()) else None
    return meta.plans[key]
