"""Quantized linears on the GPU: GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
IQ4_XS) and
weight-only int8 multiplied by Triton kernels that dequantize in registers, so a decode step reads the packed bytes,
not float weights.

    layer = TritonQuantLinear.from_gguf(qweight, GGMLType.Q4_K, in_features=2048, device="cuda")
    layer = TritonQuantLinear.from_float(weight)        # --quantization int8: per-output-feature scales
    y = layer(x)                                        # x [M, in] float32 / float16 / bfloat16 -> [M, out], x.dtype

Every format is stored as ``BlockQuants`` (``loom.ops.quantized``): quants [out, in] (4-bit ones two a byte, the
first 16 of each 32 in the low nibbles), a scale per group of 16 or 32 (float16 where the file's is one, float32
where it is a product: Q4_K, Q6_K), an optional offset, so weight = (q - zero) * scale (+ offset) and one kernel
serves all formats. 5- and 6-bit quants take a byte each here (Q6_K: 8 + 2 bits a weight, against 6.56 in the
file), 2- and 3-bit ones half a byte; 4- and 8-bit ones keep their size (Q4_K: 4 + 2 with its float32 scales).
IQ4_NL's and IQ4_XS's 4-bit quants index 16 non-uniform levels: here each becomes its level, a byte a weight (the
CPU kernels keep the nibbles and look the levels up in registers).

Two kernels, chosen by the number of rows of x:
- up to ``GEMV_ROWS`` rows (decode): each program owns ``BLOCK_N`` output features of all rows and walks the inputs,
  dequantizing a [BLOCK_N, BLOCK_K] tile once for every row (float32 products summed; no tensor cores, the step is
  bound by reading the weight);
- more rows: a tiled GEMM with ``tl.dot`` (tensor cores on the dequantized tile in x's dtype; float32 x in IEEE
  float32), up to ``DEQUANTIZE_ROWS``; from there the weight is dequantized once into x's dtype by a third kernel
  and multiplied by cuBLAS (prefill chunks are bound by FLOPs, not bytes).
A decode-sized GEMV or GEMM has few programs (``cdiv(out, BLOCK_N)``: 18 for SmolLM2's 576 features, 128 for 4096)
where the GPU has 132 SMs that each need several to hide memory latency, so where the grid would under-fill the
device the inputs are split too (**split-K**, ``split_k``): each program sums a slice of K into a float32 partial and a
small kernel adds the slices in a fixed order (deterministic, so CUDA graphs replay what eager runs compute), then the
bias, and rounds to x's dtype.
Accumulation is float32 throughout; bias added in float32; the output rounded to x's dtype. Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import nn

from loom.ops.quantized import BlockQuants, block_quants

GEMV_ROWS = 8
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEQUANTIZE_ROWS = 128
PROGRAMS_PER_SM = 4
"""Split K until the grid holds this many programs per SM (registers allow 2-4 resident at a time; more queue)."""
MIN_SPLIT_STEPS = 4
"""Each slice of K walks at least this many BLOCK_K steps (the partials' extra traffic stays small)."""
MAX_SPLITS = 16


def split_k(programs: int, k: int, block_k: int, sms: int) -> tuple[int, int]:
    """(slices, inputs per slice) of K for a launch of ``programs`` programs on a device of ``sms`` SMs: one slice
    (no split) when the grid fills the device already or K is too short to split, else as many as bring the grid to
    ``PROGRAMS_PER_SM`` a SM, each slice a whole number of BLOCK_K steps (so 4-bit bytes and quant groups are never
    cut) and at least ``MIN_SPLIT_STEPS`` of them."""
    want = triton.cdiv(PROGRAMS_PER_SM * sms, programs) if sms > 0 else 1
    splits = max(1, min(want, MAX_SPLITS, k // (MIN_SPLIT_STEPS * block_k)))
    per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return triton.cdiv(k, per), per


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _weight_tile(q_ptr, s_ptr, o_ptr, rn, k, n_ok, k_ok, stride_qn, stride_sn, stride_sg,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """The float32 weights [BLOCK_N, BLOCK_K] of features ``rn`` at inputs ``k``."""
    ok = n_ok[:, None] & k_ok[None, :]
    if BITS == 4:  # byte 16 g + j holds inputs 32 g + j (low nibble) and 32 g + 16 + j (high)
        byte = (k // 32) * 16 + (k % 16)
        shift = ((k // 16) % 2) * 4
        raw = tl.load(q_ptr + rn[:, None] * stride_qn + byte[None, :], mask=ok, other=0)
        q = ((raw >> shift[None, :].to(tl.uint8)) & 15).to(tl.float32)
    else:
        q = tl.load(q_ptr + rn[:, None] * stride_qn + k[None, :], mask=ok, other=0).to(tl.float32)
    g = k // GROUP
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=ok, other=0.0).to(tl.float32)
    w = (q - ZERO) * s
    if HAS_OFFSET:
        w += tl.load(o_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=ok, other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K, K_SLICE,
                 stride_xm, stride_qn, stride_sn, stride_sg, stride_ym, stride_ys,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [0, M) of x times features of program 0's block, over inputs of program 1's slice of K (the whole of K
    when there is one slice); the slice's sum goes to y + slice * stride_ys."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok, m_ok = rn < N, rm < M
    k_start = tl.program_id(1) * K_SLICE
    k_end = tl.minimum(k_start + K_SLICE, K)
    y_ptr += tl.program_id(1).to(tl.int64) * stride_ys
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        w = _weight_tile(q_ptr, s_ptr, o_ptr, rn, k, n_ok, k_ok, stride_qn, stride_sn, stride_sg,
                         BITS, GROUP, ZERO, HAS_OFFSET)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K, K_SLICE,
                 stride_xm, stride_qn, stride_sn, stride_sg, stride_ym, stride_ys,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of the product over program 2's slice of K, as ``_gemv_kernel``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok, m_ok = rn < N, rm < M
    k_start = tl.program_id(2) * K_SLICE
    k_end = tl.minimum(k_start + K_SLICE, K)
    y_ptr += tl.program_id(2).to(tl.int64) * stride_ys
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(q_ptr, s_ptr, o_ptr, rn, k, n_ok, k_ok, stride_qn, stride_sn, stride_sg,
                         BITS, GROUP, ZERO, HAS_OFFSET)
        if IEEE:  # float32 x, or any x under the interpreter (its tl.dot of bfloat16 operands is not a product)
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(p_ptr, b_ptr, y_ptr, N, SIZE, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the SPLITS partials [SPLITS, SIZE] summed in order (+ bias per feature), in y's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < SIZE
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(p_ptr + s * SIZE + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, o_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_sg, stride_wn,
                       BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, k < K
    w = _weight_tile(q_ptr, s_ptr, o_ptr, rn, k, n_ok, k_ok, stride_qn, stride_sn, stride_sg,
                     BITS, GROUP, ZERO, HAS_OFFSET)
    tl.store(w_ptr + rn[:, None] * stride_wn + k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


class TritonQuantLinear(nn.Module):
    """y = x W^T (+ b) with W kept as ``BlockQuants`` on the device (see the module's docstring)."""

    def __init__(self, bq: BlockQuants, in_features: int, bias: torch.Tensor | None = None, kind: str = ""):
        super().__init__()
        if bq.values is not None:  # IQ4: each quant replaced by its level, kept as int8 (a byte a weight on the GPU)
            bq = BlockQuants(bq.values.to(bq.q.device)[bq.q.long()], bq.scale, bq.offset, bq.zero, bq.group, bits=8)
        if bq.bits == 4:
            if bq.q.dtype != torch.uint8 or in_features % 32:
                raise ValueError("4-bit quants must be uint8 with in_features a multiple of 32")
            halves = bq.q.unflatten(-1, (-1, 2, 16))  # per 32: the first 16 low nibbles, the next 16 high
            q = (halves[..., 0, :] | (halves[..., 1, :] << 4)).flatten(-2)
        else:
            q = bq.q
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", bq.scale.contiguous(), persistent=False)
        self.register_buffer("offset", None if bq.offset is None else bq.offset.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.bits, self.group, self.zero = bq.bits, bq.group, bq.zero
        self.in_features, self.out_features = in_features, bq.q.shape[0]
        self.kind = kind
        self.split_k: int | None = None
        """Slices of K for the GEMV and GEMM kernels: None chooses by the grid and the device's SMs (``split_k``)."""
        # per-output-feature scales (int8): one column read for every group (stride 0)
        self.scale_group_stride = 0 if self.scale.shape[1] == 1 else 1

    @classmethod
    def from_gguf(cls, qweight: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> TritonQuantLinear:
        from loom.ops.quantized import GGMLType

        bq = block_quants(qweight, qtype, in_features).to(device)
        return cls(bq, in_features, None if bias is None else bias.float().to(device), GGMLType(int(qtype)).name)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   amax: torch.Tensor | None = None) -> TritonQuantLinear:
        """Weight-only int8 (``--quantization int8``): q = round(w / s) in [-127, 127], s = amax / 127 per output
        feature, computed on the weight's device from its values (``amax``: given, for a tensor-parallel rank's
        columns of whole rows)."""
        weight = weight.detach().float()
        scale = (weight.abs().amax(1) if amax is None else amax.float().to(weight.device))[:, None] / 127
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round(weight * inverse).clamp(-127, 127).to(torch.int8)
        bq = BlockQuants(q, scale, None, zero=0, group=weight.shape[1], bits=8)
        return cls(bq, weight.shape[1], None if bias is None else bias.detach().float(), "int8")

    def _args(self):
        offset = self.offset if self.offset is not None else self.scale
        return (self.q, self.scale, offset)

    def _meta(self) -> dict:
        return dict(BITS=self.bits, GROUP=self.group if self.scale_group_stride else 1 << 30, ZERO=self.zero,
                    HAS_OFFSET=self.offset is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in ``dtype``, by the kernel (exactly ``dequantize_block_quants`` in float32)."""
        n, k = self.out_features, self.in_features
        w = torch.empty(n, k, dtype=dtype, device=self.q.device)
        grid = (triton.cdiv(n, 32), triton.cdiv(k, 64))
        _dequantize_kernel[grid](*self._args(), w, n, k, self.q.stride(0), self.scale.stride(0),
                                 self.scale_group_stride, w.stride(0), **self._meta(), BLOCK_N=32, BLOCK_K=64)
        return w

    def plan(self, m: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """How ``m`` rows (fewer than ``DEQUANTIZE_ROWS``) are multiplied: (kernel, grid without the K axis, slices of
        K, inputs per slice, the kernel's tile options)."""
        k = self.in_features
        wide = 4 if _INTERPRETED else 1  # the interpreter's cost is per program: fewer, wider ones for the tests
        if m <= GEMV_ROWS:
            block_m, block_n = max(1, triton.next_power_of_2(m)), 32 * wide
            # NOTE: the product tile is [BLOCK_M, BLOCK_N, BLOCK_K] floats in registers: at 5-8 rows a 64-wide K
            # step spilled 176-336 B on sm_90 (scripts/triton_sm90.py); a 32-wide one uses 80-96 registers
            block_k = 64 if block_m <= 4 else 32
            kernel, grid, options = _gemv_kernel, (triton.cdiv(self.out_features, block_n),), {}
        else:
            block_m, block_n, block_k = (16 if m <= 16 else 32 if m <= 32 else 64), 64 * wide, 32
            kernel = _gemm_kernel
            grid = (triton.cdiv(m, block_m), triton.cdiv(self.out_features, block_n))
            options = dict(IEEE=dtype == torch.float32 or _INTERPRETED)
        if self.split_k is not None:
            per = triton.cdiv(triton.cdiv(k, self.split_k), block_k) * block_k
            splits = triton.cdiv(k, per)
        else:
            sms = 0
            if device.type == "cuda":
                sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            splits, per = split_k(math.prod(grid), k, block_k, sms)
        return kernel, grid, splits, per, options | dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, n, k = x.shape[0], self.out_features, self.in_features
        if m >= DEQUANTIZE_ROWS:
            return nn.functional.linear(x, self.dequantize(x.dtype),
                                        None if self.bias is None else self.bias.to(x.dtype)).reshape(*shape[:-1], n)
        kernel, grid, splits, per, options = self.plan(m, x.device, x.dtype)
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        bias = self.bias if self.bias is not None else self.scale
        kernel[(*grid, splits)](
            x, *self._args(), bias, out, m, n, k, per, x.stride(0), self.q.stride(0), self.scale.stride(0),
            self.scale_group_stride, out.stride(-2), m * n, **self._meta(),
            HAS_BIAS=self.bias is not None and splits == 1, **options)
        if splits > 1:
            block = 1024
            _split_sum_kernel[(triton.cdiv(m * n, block),)](out, bias, y, n, m * n, splits,
                                                           HAS_BIAS=self.bias is not None, BLOCK=block)
        return y.reshape(*shape[:-1], n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind or 'quantized'} "
                f"({self.bits}-bit quants, groups of {self.group})")
