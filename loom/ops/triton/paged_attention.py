"""Paged decode attention in Triton: K/V read in place from the block-paged cache through the block tables (no
gather copy), split-KV ("flash-decoding") for long contexts, GQA, online softmax, float32 accumulation.

    out = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)     # the contract of
                                                                               # loom.ops.attention's reference

Grid: (sequence, KV head, split). A program loads the G query heads that share its KV head, walks the blocks of its
split of the context — one block table entry per iteration, ``block_size`` keys at a time — keeping a running max,
sum and weighted value sum per query head, and writes them; a small second pass (plain torch: S splits per row)
combines the splits by their log-sum-exp. Contexts shorter than one split use one split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    heads = kv_head * G + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < G
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    first = split * BLOCKS_PER_SPLIT
    for i in range(BLOCKS_PER_SPLIT):
        block_index = first + i
        start = block_index * BLOCK_SIZE
        if start < length:
            block = tl.load(tables_ptr + seq * stride_tb + block_index)
            pos_ok = start + offs < length
            kv_off = block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_D]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_SIZE]
            scores = tl.where(pos_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
    out_off = seq * stride_ab + heads[:, None] * stride_ah + split * stride_as + dims[None, :]
    tl.store(acc_ptr + out_off, acc, mask=head_ok[:, None] & dim_ok[None, :])
    stat_off = seq * stride_mb + heads * stride_mh + split
    tl.store(max_ptr + stat_off, m_i, mask=head_ok)
    tl.store(sum_ptr + stat_off, l_i, mask=head_ok)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, blocks_per_split: int = 16) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32
    -> [B, H, D] in q's dtype."""
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if b == 0:
        return q.new_empty(q.shape)
    group = h // hkv
    max_blocks = block_tables.shape[1]
    splits = max(1, -(-max_blocks // blocks_per_split))
    acc = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    maxes = torch.full((b, h, splits), float("-inf"), dtype=torch.float32, device=q.device)
    sums = torch.zeros(b, h, splits, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _decode_split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, maxes, sums,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        G=group, BLOCK_G=max(triton.next_power_of_2(group), 1), D=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size, BLOCKS_PER_SPLIT=blocks_per_split,
    )  # fmt: skip
    # Combine the splits: weights exp(m_s - m) per split, empty splits (m = -inf) weigh nothing.
    top = maxes.max(dim=-1, keepdim=True).values
    weights = torch.exp(maxes - top).nan_to_num(0.0)
    total = (sums * weights).sum(-1, keepdim=True)
    out = (acc * weights.unsqueeze(-1)).sum(2) / total
    return out.to(q.dtype)
