"""Linear layers whose float32 weights are packed once for oneDNN, for CPU inference.

``F.linear`` on CPU calls MKL's sgemm, which on these AMD cores re-blocks the weight on every call: with the few
rows of a decode step that is most of the time. Measured here (2 threads, SmolLM2-135M's layer shapes, 30 layers):
MKL 33 GFLOP/s at 8 rows, 81 at 37, 188 at 2048; the same matmuls through oneDNN with pre-packed weights (what
torch.compile's CPU freezing pass does) 97, 173 and 218. ``pack_linears`` swaps a model's ``nn.Linear`` modules for
``PackedLinear``; results equal ``F.linear`` up to float32 summation order.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (no autograd; the original weight is not kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] float32 -> [T, out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> int:
    """Replace every float32 CPU ``nn.Linear`` under ``module`` by a ``PackedLinear``; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear.from_linear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
