"""FP8 checkpoints (weights in float8 e4m3 / e5m2 beside their scales), expanded to the model's dtype at load, as
transformers does on a machine without FP8 kernels. Three layouts, told apart by the scale's shape:

- block scales (``quant_method: fp8``, transformers' FineGrainedFP8: Qwen3-*-FP8, DeepSeek-V3; compressed-tensors'
  ``block`` strategy): ``weight_scale_inv`` (or ``weight_scale``) [ceil(out / bm), ceil(in / bn)], one per
  ``weight_block_size`` tile; edge tiles may be partial;
- per output channel (compressed-tensors' FP8-dynamic, fbgemm_fp8): ``weight_scale`` [out, 1];
- per tensor (compressed-tensors' static FP8): one scale.

The weight is ``float(w8) * scale`` in every case (``weight_scale_inv`` is named for the quantizer's side: it
multiplies here too, as in transformers and vLLM)."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [..., out, in] float8, scale as the module docstring lists -> [..., out, in] in ``dtype``. ``block``:
    the tile of block scales (the config's ``weight_block_size``); None: derived from the scale grid where it divides
    the weight evenly."""
    if weight.dtype not in FP8_DTYPES:
        raise ValueError(f"an FP8 weight is float8_e4m3fn or float8_e5m2, got {weight.dtype}")
    w, s = weight.float(), scale.float()
    out, cols = w.shape[-2:]
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    if s.shape[-2:] == (out, 1) or s.shape == (*w.shape[:-2], out):  # per output channel
        return (w * s.reshape(*w.shape[:-1], 1)).to(dtype)
    if s.dim() != w.dim():
        raise ValueError(f"FP8 weight {tuple(w.shape)} with a scale of shape {tuple(s.shape)}: neither per tensor, "
                         "per channel nor per block")
    rows_g, cols_g = s.shape[-2:]
    if block is None:
        if out % rows_g or cols % cols_g:
            raise ValueError(f"FP8 weight {tuple(w.shape)} with {rows_g} x {cols_g} block scales: the config gives no "
                             "weight_block_size and the grid does not divide the weight")
        block = (out // rows_g, cols // cols_g)
    bm, bn = block
    if -(-out // bm) != rows_g or -(-cols // bn) != cols_g:
        raise ValueError(f"FP8 weight {tuple(w.shape)} with a {rows_g} x {cols_g} scale grid does not match blocks "
                         f"of {bm} x {bn}")
    grid = s.repeat_interleave(bm, dim=-2)[..., :out, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return (w * grid).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn weight, float32 scales): per ``block`` tile (scales [ceil(out / bm),
    ceil(in / bn)]), or per output channel ([out, 1]) without one; each scale is the tile's amax / 448 (e4m3's
    largest value). For writing test checkpoints."""
    w = weight.float()
    out, cols = w.shape
    if block is None:
        scale = (w.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-12)
        return (w / scale).to(torch.float8_e4m3fn), scale
    bm, bn = block
    rows_g, cols_g = -(-out // bm), -(-cols // bn)
    padded = torch.zeros(rows_g * bm, cols_g * bn)
    padded[:out, :cols] = w
    tiles = padded.view(rows_g, bm, cols_g, bn)
    scale = (tiles.abs().amax((1, 3)) / 448.0).clamp_min(1e-12)  # [rows_g, cols_g]
    q = (tiles / scale[:, None, :, None]).view(rows_g * bm, cols_g * bn)[:out, :cols]
    return q.to(torch.float8_e4m3fn), scale
