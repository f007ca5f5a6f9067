"""Rotary position embeddings (the Llama / HF "rotate half" layout), with Llama-3, linear and Phi-3's LongRoPE
scaling."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, after the checkpoint's rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling {rope_type!r} is not supported; Loom supports default, linear, llama3 and "
                     "longrope")


def _longrope(head_dim: int, max_positions: int, theta: float, s: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Phi-3's LongRoPE ("su"): frequencies divided per dimension by ``short_factor`` at positions below
    ``original_max_position_embeddings`` and by ``long_factor`` from there on, cos/sin scaled by the attention factor
    (sqrt(1 + ln(factor) / ln(original)) unless given). Returns (freqs [max_positions, D/2], attention factor).
    NOTE: HF switches every position of a forward to the long factors once the longest sequence passes the original
    context; here each position keeps its own, so the two agree up to the original context (Phi-3 mini: 4096)."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or s["max_position_embeddings"] / original
    attention = s.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * theta**shape)
    long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * theta**shape)
    pos = torch.arange(max_positions, dtype=torch.float32)[:, None]
    return torch.where(pos < original, pos * short[None, :], pos * long[None, :]), attention


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables [max_positions, D] computed once, on the CPU whatever the default device (a model is built on
    the meta device, where these ops would run torch's Python meta kernels and import torch._dynamo: ~1 s of a
    server's start); ``loom.ops.layers`` rotates q and k with them."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, dtype: torch.dtype):
        super().__init__()
        attention = 1.0
        with torch.device("cpu"):
            if (scaling or {}).get("rope_type", (scaling or {}).get("type")) in ("longrope", "su"):
                freqs, attention = _longrope(head_dim, max_positions, theta, scaling)
            else:
                inv_freq = rope_inv_freq(head_dim, theta, scaling)
                freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
