"""Paged attention in Triton: K/V read in place from the block-paged cache through the block tables (no gather copy),
GQA, online softmax, float32 accumulation, sliding windows and Gemma 2's score soft-capping. ``paged_decode``: one
query per sequence, split-KV ("flash-decoding") for long contexts. ``paged_prefill``: every prefill chunk of a step
(cached prefix + the chunk, causal) in one launch. With a window, blocks wholly before it are never read (a sequence
whose every layer is windowed gives them back: their table entries are -1).

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

from loom.ops.triton.layers import tanh


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
    scale, window, softcap,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    lo = 0  # the oldest key the query sees: blocks before its block may have been given back (-1) and are not read
    if USE_WINDOW:
        lo = tl.maximum(length - window, 0)
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
        if (start < length) & (start + BLOCK_SIZE > lo):
            block = tl.load(tables_ptr + seq * stride_tb + block_index)
            pos_ok = (start + offs < length) & (start + offs >= lo)
            kv_off = block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_D]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_SIZE]
            if USE_SOFTCAP:
                scores = softcap * tanh(scores / softcap)
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
                 seq_lens: torch.Tensor, scale: float, blocks_per_split: int = 16, window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32
    -> [B, H, D] in q's dtype. ``window``: a query sees its last ``window`` keys; ``softcap``: scores become
    softcap * tanh(score / softcap) (Gemma 2)."""
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
        scale, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        G=group, BLOCK_G=max(triton.next_power_of_2(group), 1), D=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size, BLOCKS_PER_SPLIT=blocks_per_split, USE_WINDOW=window is not None,
        USE_SOFTCAP=softcap is not None,
    )  # fmt: skip
    # Combine the splits: weights exp(m_s - m) per split, empty splits (m = -inf) weigh nothing.
    top = maxes.max(dim=-1, keepdim=True).values
    weights = torch.exp(maxes - top).nan_to_num(0.0)
    total = (sums * weights).sum(-1, keepdim=True)
    out = (acc * weights.unsqueeze(-1)).sum(2) / total
    return out.to(q.dtype)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, prog_chunk_ptr, prog_row_ptr,
    chunk_row_ptr, chunk_len_ptr, chunk_pos_ptr,
    scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_tc,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    program = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // G
    chunk = tl.load(prog_chunk_ptr + program)
    first_row = tl.load(prog_row_ptr + program)  # offset of this program's rows inside the chunk
    row0 = tl.load(chunk_row_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    start_pos = tl.load(chunk_pos_ptr + chunk)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    q_pos = start_pos + rows  # each query's position in its sequence
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(q_ptr + (row0 + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    last_pos = start_pos + tl.minimum(first_row + BLOCK_M, length) - 1
    first_block = 0  # with a window: the block of the oldest key the tile's first query sees (earlier ones: maybe -1)
    if USE_WINDOW:
        first_block = tl.maximum(start_pos + first_row - window + 1, 0) // BLOCK_SIZE
    for j in range(first_block, last_pos // BLOCK_SIZE + 1):
        block = tl.load(tables_ptr + chunk * stride_tc + j)
        k_pos = j * BLOCK_SIZE + offs
        kv_off = block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=dim_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_D]
        v = tl.load(v_ptr + kv_off, mask=dim_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_M, BLOCK_SIZE]
        if USE_SOFTCAP:
            scores = softcap * tanh(scores / softcap)
        visible = (k_pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the chunk's end see nothing
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (row0 + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks, scale: float,
                  out: torch.Tensor | None = None, window: int | None = None, softcap: float | None = None,
                  block_m: int = 16) -> torch.Tensor:
    """Every prefill chunk of a step in one launch, like vLLM's unified Triton attention. ``chunks``:
    ``loom.ops.attention.PrefillChunk`` (rows [token_start, token_end) of q, position of the first, a block table
    covering the chunk's end). The chunk's own keys are already in the cache, so each query reads its cached prefix
    and its chunk causally through the table, within ``window`` keys where given, scores soft-capped by ``softcap``
    where given. q [T, H, D] -> the chunks' rows of ``out`` (allocated when None)."""
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if not chunks:
        return out
    device = q.device
    tables = torch.nn.utils.rnn.pad_sequence([c.block_table.to(torch.int32) for c in chunks], batch_first=True)
    prog_chunk, prog_row = [], []
    for i, c in enumerate(chunks):
        for row in range(0, c.token_end - c.token_start, block_m):
            prog_chunk.append(i)
            prog_row.append(row)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    _prefill_kernel[(len(prog_chunk), h)](
        q, k_cache, v_cache, out, tables, ints(prog_chunk), ints(prog_row),
        ints([c.token_start for c in chunks]), ints([c.token_end - c.token_start for c in chunks]),
        ints([c.start_pos for c in chunks]),
        scale, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0),
        G=h // hkv, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_SIZE=block_size,
        USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None,
    )  # fmt: skip
    return out
