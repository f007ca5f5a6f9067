"""Weights copied into memory madvised for transparent huge pages (``loom.ops.huge_pages``): same values, 2 MiB
aligned, the mapping flagged for huge pages (``hg`` in /proc/self/smaps), small tensors and LOOM_HUGE_PAGES=0 left
alone, and the packed matmul weights of a CPU model placed there."""

from __future__ import annotations

from pathlib import Path

import torch

from loom.ops import huge_pages
from loom.ops.huge_pages import HUGE_PAGE, huge_page_copy


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(v, 16) for v in head.split("-"))
            mapping = start <= address < end
        elif mapping and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_copy_has_the_same_values_in_aligned_memory_flagged_for_huge_pages():
    t = torch.randn(3 * HUGE_PAGE // 4 + 1000)  # 3 huge pages and a tail
    copy = huge_page_copy(t)
    if not huge_pages.available():  # THP "never" (or no libc): the tensor is kept as it is
        assert copy is t and "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return
    assert copy.data_ptr() != t.data_ptr() and torch.equal(copy, t)
    assert copy.data_ptr() % HUGE_PAGE == 0
    assert "hg" in vm_flags(copy.data_ptr())  # MADV_HUGEPAGE (the original's flags are the allocator's business:
    # glibc or torch may madvise large blocks themselves, so they are not asserted)
    del t
    copy.add_(1)  # still mapped, still writable


def test_small_tensors_and_the_off_switch_keep_their_memory(monkeypatch):
    small = torch.randn(1000)
    assert huge_page_copy(small) is small
    monkeypatch.setenv("LOOM_HUGE_PAGES", "0")
    huge_pages.available.cache_clear()
    try:
        big = torch.randn(HUGE_PAGE)
        assert huge_page_copy(big) is big
    finally:
        monkeypatch.undo()
        huge_pages.available.cache_clear()


def test_packed_and_quantized_weights_live_in_huge_pages():
    from loom.ops.packed_linear import PackedLinear, panel_available
    from loom.ops.quantized import Int8Linear

    flagged = huge_pages.available()  # else every weight keeps its ordinary memory
    weight = torch.randn(2048, 576)  # 4.7 MB float32
    if panel_available():  # else PackedLinear holds oneDNN's layout, left where oneDNN put it
        packed = PackedLinear(weight, None)
        assert ("hg" in vm_flags(packed.packed_weight.data_ptr())) == flagged
        x = torch.randn(3, 576)
        torch.testing.assert_close(packed(x), x @ weight.T, rtol=1e-5, atol=1e-4)
    int8 = Int8Linear(torch.randn(4096, 576))  # 2.4 MB of int8 tiles
    assert ("hg" in vm_flags(int8.qs.data_ptr())) == flagged
