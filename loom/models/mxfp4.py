"""MXFP4 weights (the OCP microscaling format gpt-oss ships its experts in): blocks of 32 FP4 (E2M1) values, two a
byte (low nibble first), sharing one E8M0 scale byte (2 ** (byte - 127)). Loom expands them to the model's dtype at
load, as transformers does without its Triton kernels; the checkpoint's names are ``<weight>_blocks`` [..., G, 16]
and ``<weight>_scales`` [..., G] for a weight [..., G * 32]."""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""E2M1 codes 0-15: sign bit 3, two exponent bits, one mantissa bit."""


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in ``dtype`` (exact: every value is a
    power of two times an FP4 value, so float32 and bfloat16 hold it unrounded within their exponent ranges)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks [..., G, 16] and scales [..., G] do not match: {tuple(blocks.shape)} and "
                         f"{tuple(scales.shape)}")
    values = _unpack(blocks, torch.tensor(FP4_VALUES, dtype=torch.float32))
    out = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return out.flatten(-2).to(dtype)


def _unpack(blocks: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes -> [..., G, 32] of ``levels`` indexed by the codes: element 2i from byte i's low nibble,
    2i + 1 from its high one."""
    return torch.stack([levels[(blocks & 0x0F).long()], levels[(blocks >> 4).long()]], dim=-1).flatten(-2)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] (K a multiple of 32) -> (blocks, scales) as ``dequantize_mxfp4`` takes them: per 32 values the
    smallest power-of-two scale that brings the largest magnitude within 6, each value rounded to the nearest FP4
    value (for writing test checkpoints; the round trip is exact for values already on that grid)."""
    if weight.shape[-1] % 32:
        raise ValueError(f"MXFP4 packs 32 values a block; the last dimension is {weight.shape[-1]}")
    w = weight.float().unflatten(-1, (-1, 32))  # [..., G, 32]
    amax = w.abs().amax(-1).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    lut = torch.tensor(FP4_VALUES[:8])
    scaled = (w / torch.exp2(exponent).unsqueeze(-1)).clamp(-6, 6)
    codes = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1) + 8 * (scaled < 0)  # [..., G, 32]
    pairs = codes.unflatten(-1, (16, 2)).to(torch.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4), (exponent + 127).to(torch.uint8)


Q8_0_LEVELS = tuple(int(2 * v) for v in FP4_VALUES)
"""FP4 codes as twice their value: integers, so an MXFP4 block is a Q8_0 block with scale 2 ** (byte - 128)."""


def mxfp4_as_q8_0(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """blocks [..., out, G, 16], scales [..., out, G] -> the same weights as GGUF Q8_0 rows [..., out, G * 34] uint8
    (per 32 weights a float16 scale 2 ** (byte - 128), then 32 int8 quants, twice the FP4 values), losslessly: both
    are exact. None where a scale lies outside float16's range (2 ** -24 .. 2 ** 15): the caller expands instead."""
    exponent = scales.to(torch.int32) - 128
    if exponent.numel() and (int(exponent.min()) < -24 or int(exponent.max()) > 15):
        return None
    d = torch.ldexp(torch.ones(exponent.shape), exponent).to(torch.float16)  # powers of two: exact in float16
    quants = _unpack(blocks, torch.tensor(Q8_0_LEVELS, dtype=torch.int8))
    rows = torch.cat([d.unsqueeze(-1).view(torch.uint8), quants.view(torch.uint8)], dim=-1)  # [..., G, 34]
    return rows.flatten(-2)
