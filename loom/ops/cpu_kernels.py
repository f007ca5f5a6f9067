"""Fused CPU kernels, compiled on first use with torch's C++ extension builder (g++ and ninja; cached under
``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions). Importing this module raises ImportError when no
compiler is available, and the engine falls back to the plain-PyTorch reference."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from loom.ops.attention import AttentionMetadata, decode_attention_reference

_SRC = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@cache
def _extension():
    from torch.utils.cpp_extension import load

    venv_bin = Path(os.sys.executable).parent  # ninja installed in the venv is on no PATH by default
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the flag it silently runs serially.
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
    return load(
        name="loom_paged_decode", sources=[str(_SRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False
    )


def decode_attention_cpp(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Same contract as ``decode_attention_reference``; float32 CPU tensors take the fused kernel."""
    if q.dtype != torch.float32 or q.device.type != "cpu":
        return decode_attention_reference(q, k_cache, v_cache, meta, scale)
    return _extension().paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)


try:
    _extension()
except Exception as exc:  # no compiler, no ninja, no headers: the reference path serves instead
    raise ImportError(f"Loom's CPU kernels could not be built: {exc}") from exc
