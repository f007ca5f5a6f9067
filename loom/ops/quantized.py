"""Linear layers whose weights stay in GGUF's block-quantized form (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; on the int8 path
also Q5_0, Q5_1, Q5_K, Q3_K, Q2_K and the non-linear IQ4_NL, IQ4_XS), as llama.cpp keeps them.

    layer = GGUFLinear(qweight, qtype=GGMLType.Q4_1, in_features=576)   # qweight: [out, row_bytes] uint8
    y = layer(x)                                                        # x [M, 576] float32 -> [M, out]

A decode step reads each weight once; 4-bit blocks are 5 bits a weight (Q4_1: 32 nibbles + two fp16 per block)
instead of float32's 32, so a memory-bound decode reads ~6x fewer bytes (Q4_K 4.5 bits, Q6_K 6.56). Rows are
independent, so fused projections (q/k/v, gate/up) are the quantized rows stacked.

Two ways to multiply (``csrc/gguf_ops.cpp``), chosen by ``activations``:
- ``"int8"`` (the default, llama.cpp's arithmetic): x is quantized per 32 inputs to int8 (scale amax / 127) and each
  group of weights meets it in integer dot products, 64 multiply-adds an instruction with AVX-512 VNNI (AVX2:
  ``vpmaddubsw``); the blocks are repacked at load into tiles of 16 output features for that instruction
  (``gguf_int8_pack``: the same quants and scales, laid out differently; Q4_K's scales become float32 products, so
  it takes 6 bits a weight instead of 4.5). One kernel serves every row count, decode and prefill.
- ``"float32"``: each 32-weight (sub-)block is dequantized in registers and applied to float32 rows of x (a tile of
  up to 16); from ``DEQUANTIZE_ROWS`` rows up the weight is expanded for a float32 GEMM. Exact to float rounding
  against dequantize-then-matmul; ``LOOM_GGUF_ACTIVATIONS=float32`` selects it for a whole model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import nn

from loom.ops.huge_pages import huge_page_copy

DEQUANTIZE_ROWS = 64
"""From this many rows of x, expand the weight and run a float32 GEMM (prefill chunks)."""


class GGMLType(IntEnum):
    """ggml's type ids of the formats Loom executes (the GGUF tensor_type field)."""

    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    IQ4_XS = 23


FLOAT_KERNEL_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K})
"""The types the float32-activation kernels (``activations="float32"``) read in their blocks; the others (Q5_0,
Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS) run on the int8 path only (on CPU) and through the Triton kernels (on
CUDA)."""

BLOCK_WEIGHTS = {GGMLType.Q8_0: 32, GGMLType.Q4_0: 32, GGMLType.Q4_1: 32, GGMLType.Q5_0: 32, GGMLType.Q5_1: 32,
                 GGMLType.Q2_K: 256, GGMLType.Q3_K: 256, GGMLType.Q4_K: 256, GGMLType.Q5_K: 256, GGMLType.Q6_K: 256,
                 GGMLType.IQ4_NL: 32, GGMLType.IQ4_XS: 256}
"""Weights per block (K-quants and IQ4_XS: a super-block of 8 or 16 sub-blocks with their own scales)."""

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""IQ4_NL's and IQ4_XS's 16 non-uniform levels: a 4-bit quant q stands for IQ4_VALUES[q] (times its group's scale)."""

BLOCK_BYTES = {GGMLType.Q8_0: 34, GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q5_0: 22, GGMLType.Q5_1: 24,
               GGMLType.Q2_K: 84, GGMLType.Q3_K: 110, GGMLType.Q4_K: 144, GGMLType.Q5_K: 176, GGMLType.Q6_K: 210,
               GGMLType.IQ4_NL: 18, GGMLType.IQ4_XS: 136}
"""Bytes per block of ``BLOCK_WEIGHTS`` weights."""


def dequantize_reference(qweight: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """The gguf package's own dequantizer (numpy): what the kernel is tested against."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = qweight.numpy().reshape(qweight.shape[0], -1)
    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, GGMLQuantizationType(int(qtype))))).reshape(
        qweight.shape[0], in_features)


ACTIVATIONS = ("int8", "float32")


def default_activations() -> str:
    """``LOOM_GGUF_ACTIVATIONS`` (int8 or float32), int8 when unset."""
    value = os.environ.get("LOOM_GGUF_ACTIVATIONS", "int8")
    if value not in ACTIVATIONS:
        raise ValueError(f"LOOM_GGUF_ACTIVATIONS must be one of {', '.join(ACTIVATIONS)}, got {value!r}")
    return value


class GGUFLinear(nn.Module):
    """y = x W^T (+ b) with W as GGUF blocks: ``qweight`` [out_features, in_features / block weights * block bytes]
    uint8. ``activations="int8"`` keeps the blocks repacked for int8 dot products (``qweight`` is then dropped),
    ``"float32"`` keeps them as stored; ``None``: ``default_activations()``."""

    def __init__(self, qweight: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None,
                 activations: str | None = None):
        super().__init__()
        activations = activations or default_activations()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        qtype = GGMLType(int(qtype))
        weights = BLOCK_WEIGHTS[qtype]
        if in_features % weights:
            raise ValueError(f"in_features must be a multiple of {weights} for {qtype.name} blocks, got {in_features}")
        expected = in_features // weights * BLOCK_BYTES[qtype]
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != expected:
            raise ValueError(f"{qtype.name} weight for {in_features} inputs must be [out, {expected}] uint8, got "
                             f"{list(qweight.shape)} {qweight.dtype}")
        from loom.ops.cpp_extension import gguf_extension

        self.qtype = qtype
        self.in_features = in_features
        self.out_features = qweight.shape[0]
        self.activations = activations
        self._ext = gguf_extension()  # looked up once: a decode step makes ~120 calls
        if activations == "float32" and qtype not in FLOAT_KERNEL_TYPES:
            raise ValueError(f"{qtype.name} blocks run with int8 activations only (float32 ones read "
                             f"{', '.join(t.name for t in sorted(FLOAT_KERNEL_TYPES))})")
        if activations == "int8":
            if qtype in FLOAT_KERNEL_TYPES:  # the extension reads these blocks itself
                qs, d, m = self._ext.gguf_int8_pack(qweight, int(qtype), in_features)
            else:  # spelled out here, packed by the extension
                bq = block_quants(qweight, qtype, in_features)
                offset = bq.offset if bq.offset is not None else torch.empty(0)
                qs, d, m = self._ext.gguf_int8_pack_quants(bq.q, bq.scale, offset, int(qtype))
            self._hold_tiles(qs, d, m)
        else:
            self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_quants(cls, bq: BlockQuants, in_features: int, bias: torch.Tensor | None = None) -> GGUFLinear:
        """Int8 activations over quants spelled out in groups of 32 (unsigned ``bq.q``: a GPTQ or AWQ projection,
        ``loom.models.int_quant``), packed into the tiles of the int8 format of the same arithmetic: Q4_0's or
        Q8_0's (float16 scales, no min, zero 8 or 128), else Q4_K's or Q5_K's (float32 scales and mins, zero 0; 4- or
        8-bit quants). The layer is that type's as far as the kernels go (``qtype``); its weights are exactly
        ``dequantize_block_quants(bq)``."""
        if bq.group != 32 or bq.values is not None or bq.q.dtype != torch.uint8:
            raise ValueError("from_quants takes unsigned quants in groups of 32")
        if bq.offset is None and (bq.bits, bq.zero) in ((4, 8), (8, 128)) and bq.scale.dtype == torch.float16:
            qtype, mins = (GGMLType.Q4_0 if bq.bits == 4 else GGMLType.Q8_0), torch.empty(0)
        else:
            qtype = GGMLType.Q4_K if bq.bits == 4 else GGMLType.Q5_K
            mins = -bq.zero * bq.scale.float() if bq.offset is None else bq.offset
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        from loom.ops.cpp_extension import gguf_extension

        layer.qtype, layer.in_features, layer.out_features = qtype, in_features, bq.q.shape[0]
        layer.activations, layer._ext = "int8", gguf_extension()
        layer._hold_tiles(*layer._ext.gguf_int8_pack_quants(bq.q, bq.scale, mins, int(qtype)))
        layer.register_buffer("bias", bias, persistent=False)
        return layer

    def _hold_tiles(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
        """Keep the int8 kernels' tiles (``gguf_int8_pack``'s or ``gguf_int8_pack_quants``' results), no blocks."""
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("qs", huge_page_copy(qs), persistent=False)
        self.register_buffer("scales", d, persistent=False)
        self.register_buffer("mins", m, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8" and x.dim() == 2 and x.dtype == torch.float32:  # the engine's flat batches
            return self._ext.gguf_int8_linear(x, self.qs, self.scales, self.mins, self.qtype.value, self.out_features,
                                              self.bias)
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        if self.activations == "int8":
            y = self._ext.gguf_int8_linear(x, self.qs, self.scales, self.mins, self.qtype.value, self.out_features,
                                           self.bias)
        elif x.shape[0] >= DEQUANTIZE_ROWS:
            y = torch.nn.functional.linear(x, self.dequantize(), self.bias)
        else:
            y = self._ext.gguf_linear(x, self.qweight, self.qtype.value, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def linear(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """The int8 product on a named kernel path: "auto" (the forward's), "avx2" or "portable" (for tests)."""
        return self._ext.gguf_int8_linear(x, self.qs, self.scales, self.mins, int(self.qtype),
                                                 self.out_features, self.bias, path=path)

    def dequantize(self) -> torch.Tensor:
        """W as float32 [out_features, in_features], exactly the gguf package's dequantization."""
        if self.activations == "int8":
            return self._ext.gguf_int8_unpack(self.qs, self.scales, self.mins, self.qtype.value, self.out_features)
        return self._ext.gguf_dequantize(self.qweight, self.qtype.value, self.in_features)

    @property
    def nbytes(self) -> int:
        if self.activations == "int8":
            return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins))
        return self.qweight.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"activations={self.activations}")


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


INT8_ROWS = 1000
"""The int8 kernels' id for weight-only int8 (not a GGUF type; ``csrc/gguf_ops.cpp`` I8_ROWS)."""

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The linears ``quantize_int8`` replaces (the MoE router stays float32: its top-k decides which experts run)."""


class Int8Linear(nn.Module):
    """Weight-only int8 (``--quantization int8``): y = x W^T (+ b) with W = scale[n] q[n, k], q int8 in [-127, 127] and
    one float32 scale per output feature (amax / 127) computed here from float32 weights; executed by the GGUF int8
    kernels (activations quantized per 32, integer dot products), the quants stored offset by 128 in their tiles."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, amax: torch.Tensor | None = None):
        """``amax``: each output feature's largest |weight| when ``weight`` holds only some of its inputs (a
        tensor-parallel rank's columns); None: this weight's own."""
        super().__init__()
        from loom.ops.cpp_extension import gguf_extension

        out_features, in_features = weight.shape
        if in_features % 32:
            raise ValueError(f"int8 weights need in_features a multiple of 32, got {in_features}")
        weight = weight.detach().float()
        scale = (weight.abs().amax(1) if amax is None else amax.float()) / 127
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round(weight * inverse[:, None]).clamp(-127, 127).to(torch.int16) + 128
        tiles, groups = -(-out_features // 16), in_features // 32
        padded = torch.full((tiles * 16, in_features), 128, dtype=torch.int16)
        padded[:out_features] = q
        scales = torch.zeros(tiles * 16)
        scales[:out_features] = scale
        # byte 64 j + 4 n + l of a group's line: feature n's quant for input 32 g + 4 j + l
        qs = padded.to(torch.uint8).reshape(tiles, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, groups, 512)
        self.register_buffer("qs", huge_page_copy(qs.contiguous()), persistent=False)
        self.register_buffer("scales", scales.reshape(tiles, 1, 16).expand(tiles, groups, 16).contiguous(),
                             persistent=False)
        self.register_buffer("mins", torch.empty(0), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.in_features, self.out_features = in_features, out_features
        self._ext = gguf_extension()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.linear(x.reshape(-1, self.in_features).float(), "auto")
        return y.reshape(*shape[:-1], self.out_features)

    def linear(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """The product on a named kernel path: "auto" (the forward's), "avx2" or "portable" (for tests)."""
        return self._ext.gguf_int8_linear(x, self.qs, self.scales, self.mins, INT8_ROWS, self.out_features,
                                          self.bias, path=path)

    def dequantize(self) -> torch.Tensor:
        """W as float32 [out_features, in_features]: scale[n] q[n, k]."""
        return self._ext.gguf_int8_unpack(self.qs, self.scales, self.mins, INT8_ROWS, self.out_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output feature"


def quantize_int8(model: nn.Module, make=None) -> int:
    """Replace the projections (``QUANTIZED_PROJECTIONS``) of a model's layers and its LM head by int8 layers with a
    scale per output feature, ``make(weight, bias, amax)`` (default ``Int8Linear``, for a float32 CPU model; the GPU
    path passes ``TritonQuantLinear.from_float``); returns how many. The embedding table stays float for lookups (a
    tied head gets an int8 copy). A tensor-parallel rank's row-parallel projections hold some columns of each row:
    their scales come from ``model.row_amax`` (the whole rows', noted by the loader), so every rank's quants are the
    ones a single rank would have."""
    make = make or Int8Linear
    row_amax = getattr(model, "row_amax", {})
    count = 0
    for path, module in model.layers.named_modules():
        for name in QUANTIZED_PROJECTIONS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child.weight, child.bias, row_amax.get(f"layers.{path}.{name}.weight")))
                count += 1
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.logits_proj = make(head)
    model.lm_head = None
    return count + 1


@dataclass
class BlockQuants:
    """A block-quantized weight spelled out for kernels that dequantize in registers (the Triton path): weight
    [n, k] = (q[n, k] - zero) * scale[n, k // group] (+ offset[n, k // group]). Every GGUF format Loom executes is of
    this shape (Q4_K's 6-bit sub-block scales and mins become float32 products, Q6_K's 16-weight groups float32
    products d * scale), so one kernel serves all; ``bits`` is how the kernel stores q (4: two a byte)."""

    q: torch.Tensor
    """[n, k] quants: uint8 (unsigned formats) or int8 (signed: Q8_0, Q6_K with its offset of 32 removed)."""
    scale: torch.Tensor
    """[n, k / group] float16 (where the file's scale is a float16) or float32 (products of scales)."""
    offset: torch.Tensor | None
    """[n, k / group], added after scaling (Q4_1's m, Q4_K's -dmin * m), or None."""
    zero: int
    group: int
    bits: int
    values: torch.Tensor | None = None
    """int8 [16] levels the quants index (IQ4_NL, IQ4_XS: weight = values[q] * scale), or None (the quants are the
    levels)."""

    def to(self, device: torch.device | str) -> BlockQuants:
        """The same quants on ``device``."""
        return BlockQuants(*(None if t is None else t.to(device) for t in (self.q, self.scale, self.offset)),
                           self.zero, self.group, self.bits, self.values)


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block, as a [n, blocks] float16 tensor."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16 j] bytes -> [..., 32 j]: each run of 16 bytes gives its low nibbles, then its high ones (ggml's
    order for 32 weights)."""
    qs = qs.unflatten(-1, (-1, 16))
    return torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-3)


def _bits(words: torch.Tensor) -> torch.Tensor:
    """[..., b] bytes -> [..., 8 b] bits: bit i of the little-endian word they make."""
    return torch.stack([(words >> j) & 1 for j in range(8)], dim=-1).flatten(-2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> the 8 sub-blocks' 6-bit scales and mins."""
    low, high = s[..., 0:4], s[..., 4:8]
    sc = torch.cat([low & 63, (s[..., 8:12] & 15) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([high & 63, (s[..., 8:12] >> 4) | ((high >> 6) << 4)], dim=-1)
    return sc, mins


def block_quants(qweight: torch.Tensor, qtype: int, in_features: int) -> BlockQuants:
    """Split GGUF blocks ([out, row bytes] uint8, as stored) into ``BlockQuants``: bit for bit the same weights as the
    gguf package's dequantizer gives (``BlockQuants.dequantize``)."""
    qtype = GGMLType(int(qtype))
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, BLOCK_BYTES[qtype])
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1):
        scale = _halves(blocks, 0)
        qs = _nibbles(blocks[..., 4 if qtype == GGMLType.Q4_1 else 2:]).reshape(n, in_features)
        if qtype == GGMLType.Q4_0:
            return BlockQuants(qs, scale, None, zero=8, group=32, bits=4)
        return BlockQuants(qs, scale, _halves(blocks, 2), zero=0, group=32, bits=4)
    if qtype in (GGMLType.Q5_0, GGMLType.Q5_1):  # d (, m), 32 high bits, 16 bytes of low nibbles
        start = 4 if qtype == GGMLType.Q5_1 else 2
        high = _bits(blocks[..., start:start + 4])
        qs = (_nibbles(blocks[..., start + 4:]) | (high << 4)).reshape(n, in_features)
        if qtype == GGMLType.Q5_0:
            return BlockQuants(qs, _halves(blocks, 0), None, zero=16, group=32, bits=8)
        return BlockQuants(qs, _halves(blocks, 0), _halves(blocks, 2), zero=0, group=32, bits=8)
    if qtype == GGMLType.Q5_K:  # Q4_K's scales and nibbles, and a fifth bit: sub-block s takes bit s of 32 bytes
        d, dmin = _halves(blocks, 0).float(), _halves(blocks, 2).float()
        sc, mins = _k_scales(blocks[..., 4:16].long())
        low = blocks[..., 48:].unflatten(-1, (4, 32))
        low = torch.stack([low & 15, low >> 4], dim=-2).flatten(-3, -2)  # [n, b, 8 sub-blocks, 32]
        high = torch.stack([(blocks[..., 16:48] >> s) & 1 for s in range(8)], dim=-2)
        qs = (low | (high << 4)).reshape(n, in_features)
        scale = (d[..., None] * sc.float()).reshape(n, -1)
        return BlockQuants(qs, scale, -(dmin[..., None] * mins.float()).reshape(n, -1), zero=0, group=32, bits=8)
    if qtype in (GGMLType.Q2_K, GGMLType.Q3_K):
        # 2-bit quants: 2 runs of 32 bytes, each byte 4 quants (shifts 0, 2, 4, 6 give 4 runs of 32 weights)
        at = 16 if qtype == GGMLType.Q2_K else 32
        qs = blocks[..., at:at + 64].unflatten(-1, (2, 1, 32))
        qs = torch.cat([(qs >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-2).flatten(-3)  # [n, b, 256]
        if qtype == GGMLType.Q2_K:  # 16 scale bytes (low nibble: scale, high: min), then d, dmin; groups of 16
            sc = blocks[..., :16]
            d, dmin = _halves(blocks, 80).float(), _halves(blocks, 82).float()
            scale = (d[..., None] * (sc & 15).float()).reshape(n, -1)
            offset = -(dmin[..., None] * (sc >> 4).float()).reshape(n, -1)
            return BlockQuants(qs.reshape(n, in_features), scale, offset, zero=0, group=16, bits=4)
        # Q3_K: 32 bytes of high bits (weight 32 j + l: bit j of byte l; set means no -4), 6-bit signed scales
        high = torch.cat([(blocks[..., :32] >> j) & 1 for j in range(8)], dim=-1)
        qs = (qs | (high << 2)).reshape(n, in_features)
        s = blocks[..., 96:108]
        low = torch.cat([s[..., :8] & 15, s[..., :8] >> 4], dim=-1)
        top = torch.cat([(s[..., 8:12] >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)
        sc = (low | (top << 4)).float() - 32
        scale = (_halves(blocks, 108).float()[..., None] * sc).reshape(n, -1)
        return BlockQuants(qs, scale, None, zero=4, group=16, bits=4)
    if qtype in (GGMLType.IQ4_NL, GGMLType.IQ4_XS):
        values = torch.tensor(IQ4_VALUES, dtype=torch.int8)
        if qtype == GGMLType.IQ4_NL:  # d, then 16 bytes of nibble indices
            return BlockQuants(_nibbles(blocks[..., 2:]).reshape(n, in_features), _halves(blocks, 0), None, zero=0,
                               group=32, bits=4, values=values)
        # IQ4_XS: d, 2 bytes of the sub-blocks' high scale bits (2 each), 4 bytes of low ones (4 each), 128 of nibbles
        high = blocks[..., 2:4].contiguous().view(torch.int16).long()  # [n, b, 1]
        high = torch.stack([(high >> (2 * i)) & 3 for i in range(8)], dim=-1).flatten(-2)
        low = torch.stack([blocks[..., 4:8] & 15, blocks[..., 4:8] >> 4], dim=-1).flatten(-2).long()
        scale = (_halves(blocks, 0).float()[..., None] * ((low | (high << 4)) - 32).float()).reshape(n, -1)
        return BlockQuants(_nibbles(blocks[..., 8:]).reshape(n, in_features), scale, None, zero=0, group=32, bits=4,
                           values=values)
    if qtype == GGMLType.Q8_0:
        qs = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, in_features)
        return BlockQuants(qs, _halves(blocks, 0), None, zero=0, group=32, bits=8)
    if qtype == GGMLType.Q4_K:
        d, dmin = _halves(blocks, 0).float(), _halves(blocks, 2).float()
        sc, mins = _k_scales(blocks[..., 4:16].long())
        qs = blocks[..., 16:].unflatten(-1, (4, 32))  # 4 runs of 32 bytes: low nibbles one sub-block, high the next
        qs = torch.stack([qs & 15, qs >> 4], dim=-2).reshape(n, in_features)
        scale = (d[..., None] * sc.float()).reshape(n, -1)
        return BlockQuants(qs, scale, -(dmin[..., None] * mins.float()).reshape(n, -1), zero=0, group=32, bits=4)
    # Q6_K: per 128-weight half, 64 bytes of low nibbles, 32 of 2-bit high parts, then 16 int8 scales and d
    ql = blocks[..., :128].unflatten(-1, (2, 2, 32))  # [n, b, half, run, 32]
    qh = blocks[..., 128:192].unflatten(-1, (2, 1, 32))
    low = torch.stack([ql & 15, ql >> 4], dim=-3).flatten(-3, -2)  # [n, b, half, 4 quarters, 32]
    high = torch.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-2).flatten(-3, -2)
    qs = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(n, in_features)
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()
    scale = (_halves(blocks, 208).float()[..., None] * scales).reshape(n, -1)
    return BlockQuants(qs, scale, None, zero=0, group=16, bits=8)


def dequantize_block_quants(bq: BlockQuants) -> torch.Tensor:
    """float32 [n, k]: (q - zero) * scale (+ offset), group by group (q the level it indexes, where there are)."""
    q = bq.q if bq.values is None else bq.values.to(bq.q.device)[bq.q.long()]
    w = (q.float() - bq.zero).unflatten(-1, (-1, bq.group)) * bq.scale.float()[..., None]
    if bq.offset is not None:
        w = w + bq.offset.float()[..., None]
    return w.flatten(-2)
