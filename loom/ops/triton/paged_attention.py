"""Paged attention in Triton: K/V read in place from the block-paged cache through the block tables (no gather copy),
GQA, online softmax, float32 accumulation, sliding windows, Gemma 2's score soft-capping and gpt-oss' attention sinks
(a learned logit per head that joins each softmax's sum with no value). ``paged_decode``: one
query per sequence, split-KV ("flash-decoding") for long contexts. ``paged_prefill``: every prefill chunk of a step
(cached prefix + the chunk, causal) in one launch. With a window, blocks wholly before it are never read (a sequence
whose every layer is windowed gives them back: their table entries are -1).

    out = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)     # the contract of
                                                                               # loom.ops.attention's reference

Both kernels walk the keys in tiles of BLOCK_N positions, whatever the cache's block size: each key's block comes
from the table (one gathered load per tile), so a tile spans several cache blocks. Scores and the weighted values are
``tl.dot`` products (tensor cores on a GPU; float32 operands in IEEE precision, not TF32), accumulated in float32.

Decode grid: (sequence, KV head, split). A program holds the G query heads that share its KV head (padded to 16 rows,
the smallest ``tl.dot`` tile: a memory-bound kernel does not mind the idle rows), walks its split of the context,
keeps a running max, sum and weighted value sum per query head, and writes them (a split with no keys of its row
writes nothing); a second kernel, one program per (sequence, query head), combines the row's splits that saw keys
by their log-sum-exp (as vLLM's paged_attention_v2 reduce does). Contexts shorter than one split use one split.
Prefill grid: (query tile, KV head): a tile's BLOCK_M rows are BLOCK_M / G tokens of one chunk x the G query heads
that share the KV head (as vLLM's unified attention packs them), so each K/V tile is read once for the G heads and a
short chunk still fills the tile; flash-attention style.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.ops.triton.layers import tanh


@triton.jit
def _kv_tile(k_ptr, v_ptr, table_ptr, pos, key_ok, kv_head, dims, dim_ok, stride_kb, stride_ks, stride_kh,
             BLOCK_SIZE: tl.constexpr, SHARED_KV: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] at the key positions ``pos`` of one sequence, each key's cache block read from its
    table row ``table_ptr`` (masked keys: zeros, their table entry and block never read). ``SHARED_KV``: the values
    are the keys (a latent cache, DeepSeek's MLA): read once."""
    # NOTE: int32 offsets: block * stride_kb overflows once one layer's cache holds 2**31 elements (4 GiB in bf16).
    # int64 ones (the block id, or each key's row start) spill 16 B of registers in the float32 prefill on sm_90.
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=key_ok, other=0)
    off = block[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
    mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + off, mask=mask, other=0.0)
    if SHARED_KV:
        return k, k
    return k, tl.load(v_ptr + off, mask=mask, other=0.0)


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, softcap, USE_SOFTCAP: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One tile of keys into the running max, sum and weighted value sum of the query rows ``q`` (``visible``: which
    keys each row sees; a row that has seen none stays empty)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if USE_SOFTCAP:
        scores = softcap * tanh(scores / softcap)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
    scale, window, softcap,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_KEYS: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, SHARED_KV: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // TILES  # each KV head's G query heads in TILES tiles of BLOCK_G
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    group = (tl.program_id(1) % TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    heads = kv_head * G + group
    head_ok = group < G
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    end = tl.minimum((split + 1) * SPLIT_KEYS, length)
    begin = split * SPLIT_KEYS
    if USE_WINDOW:  # the oldest key the query sees: blocks before its block may have been given back (-1)
        begin = tl.maximum(begin, length - window)
    for n0 in range(begin, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        k, v = _kv_tile(k_ptr, v_ptr, tables_ptr + seq * stride_tb, pos, key_ok, kv_head, dims, dim_ok, stride_kb,
                        stride_ks, stride_kh, BLOCK_SIZE, SHARED_KV)
        m_i, l_i, acc = _softmax_step(q, k, v, key_ok[None, :], m_i, l_i, acc, scale, softcap, USE_SOFTCAP, PRECISION)
    # A split past the context (or wholly before the window) writes nothing: the combine never reads it.
    head_ok = head_ok & (tl.zeros([BLOCK_G], tl.int32) + (end - begin) > 0)
    out_off = seq * stride_ab + heads[:, None] * stride_ah + split * stride_as + dims[None, :]
    tl.store(acc_ptr + out_off, acc, mask=head_ok[:, None] & dim_ok[None, :])
    stat_off = seq * stride_mb + heads * stride_mh + split
    tl.store(max_ptr + stat_off, m_i, mask=head_ok)
    tl.store(sum_ptr + stat_off, l_i, mask=head_ok)


@triton.jit
def _with_sink(m, total, sink):
    """A softmax's running sum with a sink logit added (it has no value): (the new sum, the factor the weighted
    values take, as the max moved to the sink's where it is larger)."""
    m_new = tl.maximum(m, sink)
    alpha = tl.exp(m - m_new)
    return total * alpha + tl.exp(sink - m_new), alpha


@triton.jit
def _decode_combine_kernel(
    acc_ptr, max_ptr, sum_ptr, lens_ptr, out_ptr, sinks_ptr, window,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_KEYS: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """One (sequence, query head): the splits that saw keys, merged by their log-sum-exp (and the head's sink),
    divided by the total."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    first = 0
    if USE_WINDOW:
        first = tl.maximum(length - window, 0) // SPLIT_KEYS
    last = (length + SPLIT_KEYS - 1) // SPLIT_KEYS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    stats = seq * stride_mb + head * stride_mh  # of this row's splits in the max and sum buffers
    partials = acc_ptr + seq * stride_ab + head * stride_ah
    for split in range(first, last):  # every one saw a key: its max is finite
        m_s = tl.load(max_ptr + stats + split + tl.arange(0, 1))
        l_s = tl.load(sum_ptr + stats + split + tl.arange(0, 1))
        a_s = tl.load(partials + split * stride_as + dims, mask=dim_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
        total = total * alpha + l_s * beta
        acc = acc * alpha + a_s * beta
        m = m_new
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head + tl.arange(0, 1)).to(tl.float32)
        total, alpha = _with_sink(m, total, sink)
        acc = acc * alpha
    out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)  # a context of no keys: zeros
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def check_addressable(cache: torch.Tensor) -> None:
    """The kernels address a layer's cache with int32 offsets (int64 ones spill registers on sm_90): refuse a cache
    they would read past, instead of reading the wrong memory."""
    if cache.numel() >= 2**31:
        raise ValueError(f"one layer's KV cache holds {cache.numel():,} elements, more than the Triton attention "
                         "kernels' int32 offsets address (2**31): lower --gpu-memory-utilization, --num-kv-blocks or "
                         "--kv-cache-memory-gb, or use --attention-backend torch")


def _dot_tiles(dtype: torch.dtype, d: int) -> dict:
    """The constexprs every kernel here shares: the head dim's tile (tl.dot needs >= 16) and the product precision."""
    return dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")  # tf32: ignored for 16-bit operands


def _decode_tiles(dtype: torch.dtype, d: int) -> dict:
    """Keys per iteration and warps of the decode kernel: 32 keys with 4 warps (16 keys at head dims over 128, and
    over 64 in float32) kept every shape scripts/triton_sm90.py compiles for sm_90 free of spills, at 95-226
    registers; 64 keys took 250+ registers and spilled at head dim 256. Heads wider than 256 (MLA's 576-wide latent,
    tiled as 1024): 16 keys with 8 warps, at most ``WIDE_HEAD_TILE`` query heads a program."""
    wide = d > 128 or (dtype == torch.float32 and d > 64)
    return dict(BLOCK_N=16 if wide else 32, num_warps=8 if d > 256 else 4)


WIDE_HEAD_TILE = 16
"""Query heads one program takes at head dims over 256: DeepSeek-V3's 128 heads on its one latent head at once would
take 327 KB of shared memory (more than an H100 has) and spill 51 KB of registers a program; 16 heads compile free
of spills on sm_90 (scripts/triton_sm90.py), each tile reading the latent keys once for its 16 heads."""


def _head_tiles(group: int, d: int) -> tuple[int, int]:
    """(query heads a program takes, a power of two and at least 16 for tl.dot; programs per KV head)."""
    block = max(16, triton.next_power_of_2(min(group, WIDE_HEAD_TILE) if d > 256 else group))
    return block, -(-group // block)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, blocks_per_split: int = 16, window: int | None = None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32
    -> [B, H, D] in q's dtype. ``window``: a query sees its last ``window`` keys; ``softcap``: scores become
    softcap * tanh(score / softcap) (Gemma 2); ``sinks`` [H]: each head's sink logit (gpt-oss). A split covers
    ``blocks_per_split`` cache blocks."""
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    check_addressable(k_cache)
    if window is not None and window < 1:  # the combine would read a split no program wrote
        raise ValueError(f"window must be at least 1 key (None: no window), got {window}")
    if b == 0:
        return q.new_empty(q.shape)
    group = h // hkv
    block_g, tiles = _head_tiles(group, d)
    max_blocks = block_tables.shape[1]
    splits = max(1, -(-max_blocks // blocks_per_split))
    split_keys = blocks_per_split * block_size
    # NOTE: no fill: a split writes its partials only if it saw keys, and the combine reads only those, so the
    # traffic and work of the splits follow each row's context, not the table's width (under CUDA graphs the table
    # is padded to the model's longest context: 32 splits for SmolLM2 at 8,192 tokens, whatever the batch holds).
    acc = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    maxes = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    sums = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _decode_split_kernel[(b, hkv * tiles, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, maxes, sums,
        scale, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        G=group, BLOCK_G=block_g, TILES=tiles, BLOCK_SIZE=block_size, SPLIT_KEYS=split_keys,
        USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None, SHARED_KV=v_cache is k_cache,
        **_dot_tiles(q.dtype, d),
        **_decode_tiles(q.dtype, d), num_stages=1,
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_combine_kernel[(b, h)](
        acc, maxes, sums, seq_lens, out, seq_lens if sinks is None else sinks, window or 0,
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1), out.stride(0), out.stride(1),
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), SPLIT_KEYS=split_keys, USE_WINDOW=window is not None,
        USE_SINKS=sinks is not None, num_warps=1,
    )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, prog_chunk_ptr, prog_row_ptr,
    chunk_row_ptr, chunk_len_ptr, chunk_pos_ptr, visible_ptr, sinks_ptr,
    scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_tc,
    G: tl.constexpr, G_TILE: tl.constexpr, TILES: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_VISIBLE: tl.constexpr, USE_SINKS: tl.constexpr,
    SHARED_KV: tl.constexpr, PRECISION: tl.constexpr,
):
    program = tl.program_id(0)
    kv_head = tl.program_id(1) // TILES  # each KV head's G query heads in TILES tiles of G_TILE
    chunk = tl.load(prog_chunk_ptr + program)
    first_token = tl.load(prog_row_ptr + program)  # offset of this program's first token inside the chunk
    row0 = tl.load(chunk_row_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    start_pos = tl.load(chunk_pos_ptr + chunk)
    # The tile's rows are (token, query head) pairs: TOKENS tokens x G_TILE query heads of this KV head (all its G
    # but at wide head dims), so each K/V tile is read once for them (rows past TOKENS * G_TILE, when G_TILE is not a
    # power of two, are idle).
    r = tl.arange(0, BLOCK_M)
    tokens = first_token + r // G_TILE
    group = (tl.program_id(1) % TILES) * G_TILE + r % G_TILE
    heads = kv_head * G + group
    row_ok = (tokens < length) & (r < TOKENS * G_TILE) & (group < G)
    q_pos = start_pos + tokens  # each row's position in its sequence
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(q_ptr + (row0 + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = start_pos + tl.minimum(first_token + TOKENS, length)  # past the tile's last query
    q_last = q_pos  # the last key each row sees: its own position, or its bidirectional span's end
    if USE_VISIBLE:
        q_last = tl.load(visible_ptr + row0 + tokens, mask=row_ok, other=0)
        end = tl.maximum(end, tl.max(tl.where(row_ok, q_last, 0)) + 1)
    begin = 0
    if USE_WINDOW:  # the oldest key the tile's first query sees (earlier blocks: maybe given back, -1)
        begin = tl.maximum(start_pos + first_token - window + 1, 0)
    for n0 in range(begin, end, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        key_ok = k_pos < end
        k, v = _kv_tile(k_ptr, v_ptr, tables_ptr + chunk * stride_tc, k_pos, key_ok, kv_head, dims, dim_ok,
                        stride_kb, stride_ks, stride_kh, BLOCK_SIZE, SHARED_KV)
        visible = (k_pos[None, :] <= q_last[:, None]) & row_ok[:, None] & key_ok[None, :]
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, scale, softcap, USE_SOFTCAP, PRECISION)
    if USE_SINKS:  # every row saw a key (itself): its max is finite
        l_i, alpha = _with_sink(m_i, l_i, tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32))
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (row0 + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _prefill_tiles(dtype: torch.dtype, d: int) -> dict:
    """Query rows, keys per iteration and warps of the prefill kernel, by operand width and head dim: the largest
    tiles that scripts/triton_sm90.py found free of spills on sm_90 (16-bit: 64 x 64 up to head dim 128, 32 x 32 at
    256; float32 a step smaller each way; 76-206 registers with the G heads packed into the rows)."""
    if d > 256:  # MLA's latent (576, tiled as 1024): 16 x 16, each program on ``WIDE_HEAD_TILE`` query heads
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8)
    if dtype == torch.float32:
        rows, keys = (32, 32) if d <= 64 else (32, 16) if d <= 128 else (16, 16)
    else:
        rows, keys = (64, 64) if d <= 128 else (32, 32)
    return dict(BLOCK_M=rows, BLOCK_N=keys, num_warps=8)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks, scale: float,
                  out: torch.Tensor | None = None, window: int | None = None,
                  softcap: float | None = None, plans: dict | None = None,
                  visible: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Every prefill chunk of a step in one launch, like vLLM's unified Triton attention. ``chunks``:
    ``loom.ops.attention.PrefillChunk`` (rows [token_start, token_end) of q, position of the first, a block table
    covering the chunk's end). The chunk's own keys are already in the cache, so each query reads its cached prefix
    and its chunk causally through the table, within ``window`` keys where given, scores soft-capped by ``softcap``
    where given. q [T, H, D] -> the chunks' rows of ``out`` (allocated when None). ``plans``: a per-step dict
    (``AttentionMetadata.plans``) that keeps the launch's integer tensors for the step's other layers. ``visible``
    [T] int32: the last position each row's query sees (``AttentionMetadata.visible_through``: past its own inside a
    bidirectional span); None: causal. ``sinks`` [H]: each head's sink logit (gpt-oss)."""
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    check_addressable(k_cache)
    out = torch.empty_like(q) if out is None else out
    if not chunks:
        return out
    group = h // hkv
    g_tile = min(group, WIDE_HEAD_TILE) if d > 256 else group
    head_tiles = -(-group // g_tile)
    tiles = _prefill_tiles(q.dtype, d)
    tiles["BLOCK_M"] = max(tiles["BLOCK_M"], triton.next_power_of_2(g_tile))  # at least one token's G_TILE heads
    tokens = tiles["BLOCK_M"] // g_tile
    plan = None if plans is None else plans.get(("prefill", tokens))
    if plan is None:
        plan = prefill_plan(chunks, tokens, q.device)
        if plans is not None:
            plans[("prefill", tokens)] = plan
    tables, prog_chunk, prog_row, chunk_rows, chunk_lens, chunk_pos = plan
    _prefill_kernel[(len(prog_chunk), hkv * head_tiles)](
        q, k_cache, v_cache, out, tables, prog_chunk, prog_row, chunk_rows, chunk_lens, chunk_pos,
        chunk_pos if visible is None else visible, chunk_pos if sinks is None else sinks, scale, window or 0,
        softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0),
        G=group, G_TILE=g_tile, TILES=head_tiles, TOKENS=tokens, BLOCK_SIZE=block_size, USE_WINDOW=window is not None,
        USE_SOFTCAP=softcap is not None, USE_VISIBLE=visible is not None, USE_SINKS=sinks is not None,
        SHARED_KV=v_cache is k_cache,
        **_dot_tiles(q.dtype, d), **tiles,
        num_stages=1,
    )  # fmt: skip
    return out


def prefill_plan(chunks, tokens: int, device) -> tuple[torch.Tensor, ...]:
    """The prefill launch's integers for ``tokens`` query tokens a program: the chunks' block tables padded into one
    [chunks, blocks] int32 tensor, then per program its chunk and first row, per chunk its first row in the batch,
    length and first position. The five int32 lists reach the device in one copy. The same for every layer of a step
    (``paged_prefill`` keeps it in the step's ``plans``)."""
    tables = torch.nn.utils.rnn.pad_sequence([c.block_table.to(torch.int32) for c in chunks], batch_first=True)
    prog_chunk, prog_row = [], []
    for i, c in enumerate(chunks):
        for row in range(0, c.token_end - c.token_start, tokens):
            prog_chunk.append(i)
            prog_row.append(row)
    per_chunk = [[c.token_start, c.token_end - c.token_start, c.start_pos] for c in chunks]
    flat = torch.tensor(prog_chunk + prog_row + [v for row in zip(*per_chunk) for v in row], dtype=torch.int32)
    flat = flat.to(device, non_blocking=True)
    n, m = len(prog_chunk), len(chunks)
    return (tables, flat[:n], flat[n : 2 * n], flat[2 * n : 2 * n + m], flat[2 * n + m : 2 * n + 2 * m],
            flat[2 * n + 2 * m :])
