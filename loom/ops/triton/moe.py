"""A mixture of experts' two matmuls as grouped GEMMs over all of a step's (token, expert) pairs: vLLM's fused_moe
in outline, without a host round-trip, so a MoE layer runs in a fixed number of launches whatever the routing (and
can be captured in a CUDA graph).

    sorted_ids, block_expert, valid = align_by_expert(experts, num_experts, BLOCK_M)
    up = grouped_matmul(x, w_gate_up, sorted_ids, block_expert, valid, top_k, ...)    # [T k, 2I], a row per pair
    down = grouped_matmul(act(up), w_down, ..., weights=routing weights)              # [T k, H], weighted
    y = down.view(T, k, H).sum(1)

``align_by_expert`` orders the T k pairs by expert and pads each expert's run to a multiple of BLOCK_M (padding
entries hold T k, past every pair), so that every BLOCK_M-row tile of the ordered list belongs to one expert; the
tile count is bounded by T k + E (BLOCK_M - 1) rows, a size known without looking at the routing. Each program of
``grouped_matmul`` takes one tile and BLOCK_N output columns, reads its expert's weight [N, K] (``nn.Linear``'s
layout, stacked over experts) and the tile's input rows (a token's hidden state for gate/up, the pair's own
activations for down), accumulates in float32 and writes each pair's row; tiles past the padded total return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
"""Pairs per tile for small steps (decode: few pairs per expert): tl.dot's least."""
BLOCK_M_LARGE = 64
"""Pairs per tile from ``LARGE_STEP`` pairs on (prefill chunks): each expert's weights read once per 64 pairs."""
LARGE_STEP = 1024


def tile_rows(pairs: int) -> int:
    """Rows per tile for a step of ``pairs`` (token, expert) pairs."""
    return BLOCK_M if pairs < LARGE_STEP else BLOCK_M_LARGE


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """``experts`` [T, k] expert ids -> (sorted_ids [R] int32: pair indices t k + j ordered by expert, each expert's
    run padded to a multiple of ``block_m`` with T k; block_expert [R / block_m] int32: each tile's expert; valid [1]
    int32: the padded total). R = round_up(T k + E (block_m - 1), block_m), fixed by the shapes; only device ops."""
    flat = experts.flatten().to(torch.int64)
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    rows = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((rows,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, starts[by_expert] + rank, order.to(torch.int32))
    tile_starts = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, sorted_ptr, expert_ptr, valid_ptr, weight_ptr,
                           pairs, N, K, top_k, stride_am, stride_we, stride_wn, stride_be, stride_om,
                           PER_PAIR: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(valid_ptr):
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    live = pair < pairs
    source = pair if PER_PAIR else pair // top_k  # down reads the pair's activations, gate/up its token's state
    expert = tl.load(expert_ptr + tile).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + source[:, None].to(tl.int64) * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # the pointers step along K: addresses are computed once
        a = tl.load(a_ptrs, mask=live[:, None] & (ks[None, :] < K - k0), other=0.0)
        w = tl.load(w_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION, out_dtype=tl.float32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if WEIGHTED:  # the pair's routing weight, after the bias (the reference weights the expert's whole output)
        acc *= tl.load(weight_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (cols[None, :] < N))


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sorted_ids: torch.Tensor,
                   block_expert: torch.Tensor, valid: torch.Tensor, top_k: int, per_pair: bool,
                   routing: torch.Tensor | None = None) -> torch.Tensor:
    """out[p] = a[p or p // top_k] @ weight[e(p)].T (+ bias[e(p)]) (* routing[p]) for every pair p = t top_k + j;
    ``weight`` [E, N, K] contiguous, ``a`` rows contiguous; the alignment made with ``tile_rows(pairs)`` rows a tile.
    Returns [T top_k, N] in a's dtype."""
    pairs = routing.numel() if routing is not None else (a.shape[0] if per_pair else a.shape[0] * top_k)
    block_m = sorted_ids.numel() // block_expert.numel()
    _, n, k = weight.shape
    out = torch.empty(pairs, n, dtype=a.dtype, device=a.device)
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    wide = block_m > BLOCK_M or a.dtype == torch.float32  # 64-row tiles and 4-byte operands: 32-wide K steps
    block_k = max(16, min(32 if wide else 64, triton.next_power_of_2(k)))
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_matmul_kernel[grid](
        a, weight, bias if bias is not None else weight, out, sorted_ids, block_expert, valid,
        routing if routing is not None else weight, pairs, n, k, top_k, a.stride(0), weight.stride(0),
        weight.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0),
        PER_PAIR=per_pair, HAS_BIAS=bias is not None, WEIGHTED=routing is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit operands
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if block_m == BLOCK_M else 8,
    )  # fmt: skip
    return out
