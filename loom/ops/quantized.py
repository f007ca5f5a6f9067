"""Linear layers whose weights stay in GGUF's block-quantized form (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), as llama.cpp
keeps them.

    layer = GGUFLinear(qweight, qtype=GGMLType.Q4_1, in_features=576)   # qweight: [out, row_bytes] uint8
    y = layer(x)                                                        # x [M, 576] float32 -> [M, out]

A decode step reads each weight once; 4-bit blocks are 5 bits a weight (Q4_1: 32 nibbles + two fp16 per block)
instead of float32's 32, so a memory-bound decode reads ~6x fewer bytes (Q4_K 4.5 bits, Q6_K 6.56). The C++ kernel
(``csrc/gguf_ops.cpp``) dequantizes each 32-weight (sub-)block into registers and applies it to a tile of up to 16
rows of x; K-quant super-blocks of 256 weights are read as 8 such sub-blocks. From ``DEQUANTIZE_ROWS`` rows
up (prefill) the weight is expanded once for the call and a float32 GEMM takes over, where arithmetic, not bytes,
decides. Rows are independent, so fused projections (q/k/v, gate/up) are the quantized rows stacked.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch
from torch import nn

DEQUANTIZE_ROWS = 64
"""From this many rows of x, expand the weight and run a float32 GEMM (prefill chunks)."""


class GGMLType(IntEnum):
    """ggml's type ids of the formats Loom executes (the GGUF tensor_type field)."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14


BLOCK_WEIGHTS = {GGMLType.Q8_0: 32, GGMLType.Q4_0: 32, GGMLType.Q4_1: 32, GGMLType.Q4_K: 256, GGMLType.Q6_K: 256}
"""Weights per block (K-quants: a super-block of 8 sub-blocks with their own scales)."""

BLOCK_BYTES = {GGMLType.Q8_0: 34, GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q4_K: 144, GGMLType.Q6_K: 210}
"""Bytes per block of ``BLOCK_WEIGHTS`` weights."""


def dequantize_reference(qweight: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """The gguf package's own dequantizer (numpy): what the kernel is tested against."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = qweight.numpy().reshape(qweight.shape[0], -1)
    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, GGMLQuantizationType(int(qtype))))).reshape(
        qweight.shape[0], in_features)


class GGUFLinear(nn.Module):
    """y = x W^T (+ b) with W as GGUF blocks: ``qweight`` [out_features, in_features / block weights * block bytes]
    uint8."""

    def __init__(self, qweight: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        qtype = GGMLType(int(qtype))
        weights = BLOCK_WEIGHTS[qtype]
        if in_features % weights:
            raise ValueError(f"in_features must be a multiple of {weights} for {qtype.name} blocks, got {in_features}")
        expected = in_features // weights * BLOCK_BYTES[qtype]
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != expected:
            raise ValueError(f"{qtype.name} weight for {in_features} inputs must be [out, {expected}] uint8, got "
                             f"{list(qweight.shape)} {qweight.dtype}")
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.qtype = qtype
        self.in_features = in_features
        self.out_features = qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from loom.ops.cpp_extension import gguf_extension

        ext = gguf_extension()
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        if x.shape[0] >= DEQUANTIZE_ROWS:
            y = torch.nn.functional.linear(x, self.dequantize(), self.bias)
        else:
            y = ext.gguf_linear(x, self.qweight, int(self.qtype), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        from loom.ops.cpp_extension import gguf_extension

        return gguf_extension().gguf_dequantize(self.qweight, int(self.qtype), self.in_features)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class StackedGGUFLinear(nn.Module):
    """A fused projection whose stacked parts are of different GGUF types (llama.cpp's Q4_K_M mixes keep v in Q6_K
    beside Q4_K q and k in some layers): each part multiplies with its own kernel, the outputs are concatenated."""

    def __init__(self, parts: list[GGUFLinear]):
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError(f"stacked parts must share in_features, got {[p.in_features for p in parts]}")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([part.dequantize() for part in self.parts])
