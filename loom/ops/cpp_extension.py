"""Loom's C++ CPU kernels (``csrc/cpu_ops.cpp``, ``csrc/gguf_ops.cpp``), compiled on first use with torch's
extension builder (g++ and ninja; cached under ``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions).

    ext = extension()        # the compiled module; raises when it cannot be built (no compiler, no headers)
    gguf = gguf_extension()  # the GGUF quantized matmul

Every op releases the GIL while it computes (``py::call_guard<py::gil_scoped_release>`` on its binding), as torch's
own ops do: the server's event loop streams tokens while the engine thread multiplies (measured: TPOT 1-2% lower,
float32 SmolLM2 at c=1).

They are compiled for the CPU that builds them (``-march=native``: AVX-512 and VNNI where it has them).
``LOOM_CPU_ARCH`` names another gcc ``-march`` target, e.g. ``x86-64-v3`` (AVX2 + FMA, no AVX-512) to build for an
older CPU, or to run the AVX2 code paths on an AVX-512 machine; such a build is cached under its own name
(``loom_cpu_ops_x86_64_v3``).
"""

from __future__ import annotations

import os
import re
import sys
from functools import cache
from pathlib import Path

from torch.utils.cpp_extension import load

_CSRC = Path(__file__).parent / "csrc"


@cache
def extension():
    return _build("loom_cpu_ops", "cpu_ops.cpp")


@cache
def extension_if_built():
    """``extension()``, or None where it cannot be built (no compiler, no ninja, no headers): the callers that have a
    plain-PyTorch path take it. Cached, so a failed build is tried once, not at every call."""
    try:
        return extension()
    except Exception:  # noqa: BLE001 - whatever the build raised, the fallback is the same
        return None


@cache
def gguf_extension():
    """The GGUF block-quantized matmul (``csrc/gguf_ops.cpp``), built on first use like ``extension``."""
    return _build("loom_gguf_ops", "gguf_ops.cpp")


def cpu_arch() -> str:
    """The ``-march`` target of the extensions: ``LOOM_CPU_ARCH``, or ``native`` (the building CPU's)."""
    arch = os.environ.get("LOOM_CPU_ARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ValueError(f"LOOM_CPU_ARCH={arch!r} is not a gcc -march name (e.g. native, x86-64-v3, znver4)")
    return arch


def cache_name(name: str, arch: str) -> str:
    """The extension's name for ``arch``: a build for another target is cached beside the native one, not over it
    (torch's builder would rebuild on every switch)."""
    return name if arch == "native" else f"{name}_{re.sub(r'[^A-Za-z0-9]', '_', arch)}"


def _build(name: str, source: str):
    arch = cpu_arch()
    name = cache_name(name, arch)
    venv_bin = Path(sys.executable).parent  # ninja installed in the venv is on no PATH by default
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the flag it silently runs serially.
    flags = ["-O3", f"-march={arch}", "-ffp-contract=fast", "-fopenmp"]
    return load(name=name, sources=[str(_CSRC / source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                verbose=False)
