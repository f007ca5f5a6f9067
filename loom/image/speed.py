"""Loom's speed settings for a diffusers pipeline; needs only torch and diffusers (the CUDA benchmark loads it alone).

On CUDA: half precision (fp16, or bf16 where asked), PyTorch SDPA attention, fused QKV projections, channels-last
memory format for the convolutions, and optionally ``torch.compile`` of the UNet (worth it for long runs: the first
call compiles for about a minute). On CPU: float32 (these CPUs have no fast bf16), SDPA, inference mode; channels-last
and fused QKV are applied only where the benchmark showed they pay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SpeedSettings:
    channels_last: bool = True
    fuse_qkv: bool = True
    sdpa: bool = True
    compile_unet: bool = False
    compile_mode: str = "reduce-overhead"
    """CUDA graphs: on an H200 the SD-1.5 UNet ran 3.9x diffusers' fp16 eager default (docs/benchmarks.md)."""

    def __post_init__(self):
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be a torch.compile mode, got {self.compile_mode!r}")


def default_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA, float32 elsewhere (bf16 matmuls run at 0.2 GFLOP/s on these CPUs)."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def default_settings(device: str) -> SpeedSettings:
    if device.startswith("cuda"):
        return SpeedSettings()
    return SpeedSettings(channels_last=False, fuse_qkv=False)


def use_sdpa(module: torch.nn.Module) -> None:
    """PyTorch's scaled_dot_product_attention for every attention layer of a UNet or VAE."""
    from diffusers.models.attention_processor import AttnProcessor2_0  # optional: diffusers comes with the image extra

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0())


def apply_to_unet(unet: torch.nn.Module, settings: SpeedSettings) -> torch.nn.Module:
    """Apply the settings to a UNet in place; returns the module to call (compiled or not)."""
    if settings.sdpa:
        use_sdpa(unet)
    if settings.fuse_qkv and hasattr(unet, "fuse_qkv_projections"):
        unet.fuse_qkv_projections()
    if settings.channels_last:
        unet.to(memory_format=torch.channels_last)
    if settings.compile_unet:
        torch._inductor.config.conv_1x1_as_mm = True  # NOTE: as diffusers' speed guide advises for UNets
        unet = torch.compile(unet, mode=settings.compile_mode, fullgraph=True)
    return unet


def apply_speed_settings(pipe, settings: SpeedSettings) -> None:
    """UNet and VAE of ``pipe`` (any SD/SDXL pipeline) set up for speed, in place."""
    pipe.unet = apply_to_unet(pipe.unet, settings)
    if settings.sdpa:
        use_sdpa(pipe.vae)
    if settings.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
