"""Helpers shared by the benchmark scripts: machine facts, the float32 matmul peak, JSON results, list flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """Best-of-``repeats`` GFLOP/s of one square matmul: the machine's practical peak for this dtype, now.

    On CPU in float32 the best of MKL (``a @ b``), oneDNN with a pre-packed weight and Loom's own panel kernel
    (``loom.ops.packed_linear``, when built with AVX-512); on these AMD cores MKL is ~15% slower than the others,
    and a peak taken from the slowest library would flatter the fraction."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    candidates = [lambda: a @ b]
    if device == "cpu" and dtype == torch.float32:
        from loom.ops.packed_linear import PackedLinear, packing_available, panel_available

        if packing_available():
            candidates.append(lambda layer=PackedLinear(b, None, "onednn"): layer(a))
        if panel_available():
            candidates.append(lambda layer=PackedLinear(b, None, "panel"): layer(a))
    best = float("inf")
    for fn in candidates:
        for _ in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def sync(device: str) -> None:
    """Wait for queued GPU work, so timers measure it; a no-op on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        info["cpu_flags"] = sorted(set(flags.split(":")[1].split()) & {"avx2", "avx512f", "avx512bw", "avx512_vnni",
                                                                       "avx_vnni", "amx_int8", "f16c", "fma"})
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def names_arg(choices) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices``."""

    def parse(value: str) -> list[str]:
        names = value.split(",")
        if set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)}; got {value}")
        return names

    return parse
