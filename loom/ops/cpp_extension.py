"""Loom's C++ CPU kernels (``csrc/cpu_ops.cpp``), compiled on first use with torch's extension builder (g++ and
ninja; cached under ``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions).

    ext = extension()        # the compiled module; raises when it cannot be built (no compiler, no headers)
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from torch.utils.cpp_extension import load

_SRC = Path(__file__).parent / "csrc" / "cpu_ops.cpp"


@cache
def extension():
    venv_bin = Path(sys.executable).parent  # ninja installed in the venv is on no PATH by default
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the flag it silently runs serially.
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
    return load(name="loom_cpu_ops", sources=[str(_SRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
