"""Weights in transparent huge pages (Linux): a CPU decode step streams every weight matrix once, and with 4 KiB
pages the hardware prefetchers stop at each page boundary and the TLB misses every 4 KiB. Memory madvised with
MADV_HUGEPAGE before it is first written is backed by 2 MiB pages where the kernel has them (THP "madvise" or
"always"). On SmolLM2-135M in float32 the decode step's forward took 0.94-0.98x the time with the same weights in
ordinary pages (in-process A/B on the 2-core EPYC, docs/benchmarks.md).

    weight = huge_page_copy(weight)   # the same values, in huge-page memory (or ``weight`` itself: see below)

``LOOM_HUGE_PAGES=0`` turns it off; tensors under 2 MiB, non-CPU tensors, THP "never" and non-Linux systems keep
their memory.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def available() -> bool:
    """Whether huge-page copies are made here: Linux with THP not "never", libc found, LOOM_HUGE_PAGES not 0."""
    if os.environ.get("LOOM_HUGE_PAGES", "1") == "0" or _libc() is None:
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in anonymous memory aligned to 2 MiB, its whole 2 MiB pages madvised MADV_HUGEPAGE
    before it is written; ``t`` itself where huge pages are not ``available()``, or ``t`` is not on the CPU or is
    under 2 MiB. The copy keeps its mapping alive (unmapped when the last tensor on it is freed)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < HUGE_PAGE or not available():
        return t
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -address % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE  # the tail stays in small pages: no huge page mostly empty
    if _libc().madvise(ctypes.c_void_p(address + offset), ctypes.c_size_t(whole), _MADV_HUGEPAGE) != 0:
        return t  # e.g. a kernel built without THP: keep the original memory
    out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)  # holds a reference to buf
    out = out.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
