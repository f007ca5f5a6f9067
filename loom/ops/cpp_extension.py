"""Loom's C++ CPU kernels (``csrc/cpu_ops.cpp``, ``csrc/gguf_ops.cpp``), compiled on first use with torch's
extension builder (g++ and ninja; cached under ``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions).

    ext = extension()        # the compiled module; raises when it cannot be built (no compiler, no headers)
    gguf = gguf_extension()  # the GGUF quantized matmul
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from torch.utils.cpp_extension import load

_CSRC = Path(__file__).parent / "csrc"


@cache
def extension():
    return _build("loom_cpu_ops", "cpu_ops.cpp")


@cache
def gguf_extension():
    """The GGUF block-quantized matmul (``csrc/gguf_ops.cpp``), built on first use like ``extension``."""
    return _build("loom_gguf_ops", "gguf_ops.cpp")


def _build(name: str, source: str):
    venv_bin = Path(sys.executable).parent  # ninja installed in the venv is on no PATH by default
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the flag it silently runs serially.
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
    return load(name=name, sources=[str(_CSRC / source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                verbose=False)
