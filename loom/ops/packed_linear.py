"""Linear layers whose float32 weights are packed once for a fast CPU matmul, for inference.

``F.linear`` on CPU calls MKL's sgemm, which on these AMD cores re-blocks the weight on every call: with the few
rows of a decode step that is most of the time. Measured here (2 threads, SmolLM2-135M's layer shapes, 30 layers):
MKL 33 GFLOP/s at 8 rows, 81 at 37, 188 at 2048. Two packed backends:

- ``onednn``: oneDNN with the weight reordered once (what torch.compile's CPU freezing pass does): 97, 173, 218.
- ``panel``: Loom's own kernel (``loom/ops/csrc/cpu_ops.cpp``, weight in 32-column K-major panels, AVX-512 register
  tiles): 120 at 8 rows, 186 at 37, 205 at 2048 — faster than oneDNN up to ~128 rows, i.e. every decode step.
  AVX2 builds run 3 x 32 register tiles instead; against oneDNN held to AVX2, over SmolLM2's matrices streamed from
  memory (2026-12-05, this machine with ``LOOM_CPU_ARCH=x86-64-v3`` and ``ONEDNN_MAX_CPU_ISA=AVX2``), it took
  2.3x less time at 1 row, 1.5x at 16, 1.2x at 64, 1.1x at 256 and the same at 1024.

``auto`` takes ``panel`` where the C++ kernels built (AVX-512 or AVX2 + FMA), ``onednn`` otherwise. ``pack_linears``
swaps a model's ``nn.Linear`` modules for ``PackedLinear``; results equal ``F.linear`` up to float32 summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.ops.cpp_extension import extension_if_built
from loom.ops.huge_pages import huge_page_copy


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _panel_extension():
    """The compiled kernels when they build and have the panel matmul (AVX-512 and AVX2 builds), else None (oneDNN
    packs instead)."""
    ext = extension_if_built()
    return ext if hasattr(ext, "panel_linear") else None


def panel_available() -> bool:
    return _panel_extension() is not None


class PackedLinear(nn.Module):
    """y = x W^T + b with W held packed for ``backend`` (no autograd; the original weight is not kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        weight = weight.detach().contiguous()
        ext = _panel_extension() if backend in ("auto", "panel") else None
        if backend == "panel" and ext is None:
            raise RuntimeError("the panel matmul needs Loom's C++ kernels built with AVX-512 or AVX2 + FMA")
        self.backend = "panel" if ext is not None else "onednn"
        if self.backend == "panel":
            self._ext = ext
            self.packed_weight = huge_page_copy(ext.pack_panels(weight))  # [N / 32, K, 32], streamed every step
        else:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)

    def load_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """New values for W (and b), packed again into the same tensors (the panel's in place, so a layer plan that
        holds them reads the new ones)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.out_features} x {self.in_features} "
                             "linear")
        weight = weight.detach().float().contiguous()
        with torch.no_grad():
            if self.backend == "panel":
                self.packed_weight.copy_(self._ext.pack_panels(weight))
            else:
                self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
            if bias is not None:
                self.bias.copy_(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> PackedLinear:
        return cls(linear.weight, linear.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] float32 -> [T, out_features]."""
        if self.backend == "panel":
            return self._ext.panel_linear(x.contiguous(), self.packed_weight, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )


def pack_linears(module: nn.Module, backend: str = "auto") -> int:
    """Replace every float32 CPU ``nn.Linear`` under ``module`` by a ``PackedLinear``; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear.from_linear(child, backend))
            count += 1
        else:
            count += pack_linears(child, backend)
    return count
