"""Rotary position embeddings (the Llama / HF "rotate half" layout), with Llama-3, linear, YaRN (Qwen2.5 / Qwen3's long
context, DeepSeek's mscale) and Phi-3's LongRoPE scaling."""

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
    if rope_type == "freq_factors":  # a GGUF file's rope_freqs tensor: each frequency divided by its factor
        factors = torch.tensor(scaling["factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope_freqs holds {factors.numel()} factors but the heads rotate {inv_freq.numel()} "
                             "frequencies: the file's rotary settings do not fit its heads")
        return inv_freq / factors
    raise ValueError(f"rope scaling {rope_type!r} is not supported; Loom supports default, linear, llama3, yarn and "
                     "longrope")


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude scale for a context stretched ``factor`` times: 0.1 m ln(factor) + 1 (1 without stretch)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071), as HF and vLLM compute it: each frequency is blended between itself (extrapolated: the
    fast dimensions, more than ``beta_fast`` turns over the original context) and itself / ``factor`` (interpolated:
    the slow ones, under ``beta_slow`` turns) along a linear ramp between the two, and cos/sin are scaled by the
    attention factor (0.1 ln(factor) + 1 unless given, or DeepSeek's ratio of two such terms with ``mscale`` and
    ``mscale_all_dim``). Returns (inverse frequencies [D/2], attention factor)."""
    original = s.get("original_max_position_embeddings")
    if not original:
        raise ValueError("yarn rope scaling needs original_max_position_embeddings (the context the model was "
                         "pretrained at) in rope_scaling / rope_parameters or the config")
    factor = s.get("factor") or s["max_position_embeddings"] / original
    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dimension(turns: float) -> float:  # the dimension whose wavelength fits ``turns`` times in the context
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(fast), dimension(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    extrapolated, interpolated = 1.0 / powers, 1.0 / (factor * powers)
    return interpolated * ramp + extrapolated * (1 - ramp), float(attention)


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

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, dtype: torch.dtype,
                 rotary_dim: int | None = None):
        """``rotary_dim`` < ``head_dim`` (partial rotary, Phi-4-mini): the first ``rotary_dim`` dimensions of each head
        rotate at that width's frequencies and the rest pass through. The tables stay ``head_dim`` wide for every
        kernel: they rotate the first rotary_dim / 2 dimensions of each half, and the pass-through ones by cos 1, sin 0
        (exactly unchanged); ``partial_rotary_order`` gives the order the q/k rows are loaded in to match."""
        super().__init__()
        dim = rotary_dim or head_dim
        with torch.device("cpu"):
            rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
            if rope_type in ("longrope", "su"):
                freqs, attention = _longrope(dim, max_positions, theta, scaling)
            else:
                inv_freq, attention = (_yarn(dim, theta, scaling) if rope_type == "yarn"
                                       else (rope_inv_freq(dim, theta, scaling), 1.0))
                freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cos, sin = freqs.cos() * attention, freqs.sin() * attention
            if dim < head_dim:
                passing = (head_dim - dim) // 2
                cos = torch.cat((cos, torch.ones(max_positions, passing)), dim=-1)
                sin = torch.cat((sin, torch.zeros(max_positions, passing)), dim=-1)
            cos, sin = torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def identity(cls, head_dim: int, max_positions: int, dtype: torch.dtype) -> RotaryEmbedding:
        """Tables that rotate nothing (SmolLM3's NoPE layers): cos 1 and sin 0, so q cos + rotate_half(q) sin is q,
        exactly."""
        rotary = cls.__new__(cls)
        torch.nn.Module.__init__(rotary)
        rotary.register_buffer("cos", torch.ones(max_positions, head_dim, dtype=dtype, device="cpu"), persistent=False)
        rotary.register_buffer("sin", torch.zeros(max_positions, head_dim, dtype=dtype, device="cpu"),
                               persistent=False)
        return rotary


def partial_rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Where each dimension of a head comes from when a partial rotary (HF: rotate_half over the first ``rotary_dim``
    dimensions, pairing j with j + rotary_dim / 2; the rest untouched) is run as a full-width one (pairing j with j +
    head_dim / 2) over ``RotaryEmbedding``'s padded tables: new j < r/2 <- j, new h/2 + j <- r/2 + j, and the
    pass-through dimensions fill the rest of each half in order. q and k rows are loaded in this order (a permutation
    within each head, the same for both, so every score q . k is unchanged); v and the output are not touched."""
    if rotary_dim % 2 or (head_dim - rotary_dim) % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"a partial rotary of {rotary_dim} of {head_dim} dimensions is not supported (both even)")
    rhalf, passing = rotary_dim // 2, (head_dim - rotary_dim) // 2
    rest = torch.arange(rotary_dim, head_dim)
    return torch.cat((torch.arange(rhalf), rest[:passing], torch.arange(rhalf, rotary_dim), rest[passing:]))


def partial_rotary_rows(order: torch.Tensor, heads: int) -> torch.Tensor:
    """``order`` applied to each of ``heads`` heads' rows of a projection: the row indices, in load order."""
    return (torch.arange(heads)[:, None] * len(order) + order[None, :]).flatten()


class RotaryRows:
    """One step's own cos/sin rows [T, D], row i for the step's token i (so the step's positions are 0..T-1): what
    M-RoPE's image tokens rotate by, where the temporal, height and width positions each turn some frequencies."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin


def mrope_columns(section: tuple[int, ...], interleaved: bool = False) -> torch.Tensor:
    """Which of an image token's three positions (0 temporal, 1 height, 2 width) each rotary column [head_dim] turns
    with. Qwen2-VL: the k-th part of ``section`` takes position k % 3 (contiguous runs of frequencies); Qwen3-VL
    (``interleaved``): frequency j takes height where j % 3 == 1 and j < 3 * section[1], width where j % 3 == 2 and
    j < 3 * section[2], temporal otherwise (transformers' ``recomposition_frequencies``). Each half of the
    rotate-half layout alike."""
    half = sum(section)
    if interleaved:
        which = torch.zeros(half, dtype=torch.long, device="cpu")
        which[1 : 3 * section[1] : 3] = 1
        which[2 : 3 * section[2] : 3] = 2
    else:
        which = torch.repeat_interleave(torch.arange(len(section), device="cpu") % 3,
                                        torch.tensor(section, device="cpu"))
    return torch.cat((which, which))


def mrope_rows(rotary: RotaryEmbedding, positions: torch.Tensor, rows: torch.Tensor, mrope: torch.Tensor,
               columns: torch.Tensor) -> RotaryRows:
    """Qwen2-VL's multimodal RoPE for a step: token i rotates by the tables' row ``positions[i]`` (text: its three
    positions are equal, plain RoPE), except the image tokens at step rows ``rows``, whose column c turns with their
    position ``mrope[:, columns[c]]`` (temporal, height, width; ``mrope_columns``)."""
    cos, sin = rotary.cos[positions], rotary.sin[positions]
    which = columns.to(mrope.device)
    at = mrope[:, which]  # [R, D]
    index = torch.arange(len(which), device=mrope.device)
    cos[rows], sin[rows] = rotary.cos[at, index], rotary.sin[at, index]
    return RotaryRows(cos, sin)
