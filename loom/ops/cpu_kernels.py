"""Fused CPU kernels (``loom.ops.cpp_extension``, compiled on first use) behind ``TorchOps``' contract. Importing
this module raises ImportError when the kernels cannot be built, and the engine falls back to the plain-PyTorch
reference (``loom.ops.layers.TorchOps``)."""

from __future__ import annotations

import torch

from loom.ops.attention import AttentionMetadata, decode_attention_reference
from loom.ops.cpp_extension import extension as _extension
from loom.ops.layers import TorchOps, split_qkv
from loom.ops.packed_linear import PackedLinear, pack_linears, packing_available, panel_available


def _fast(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def decode_attention_cpp(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Same contract as ``decode_attention_reference``; float32 CPU tensors take the fused kernel."""
    if not _fast(q):
        return decode_attention_reference(q, k_cache, v_cache, meta, scale)
    return _extension().paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)


class CpuOps(TorchOps):
    """``TorchOps``' contract in fused kernels for float32 CPU tensors; anything else takes the reference."""

    name = "cpp"

    def prepare(self, model: torch.nn.Module) -> None:
        """float32 CPU models get their matmul weights packed (``loom.ops.packed_linear``: the panel kernel
        or oneDNN), the LM head too (tied or not: a tied head keeps the embedding table for lookups beside its packed
        copy)."""
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        if not ((panel_available() or packing_available()) and _fast(head)):
            return
        pack_linears(model.layers)
        if model.logits_proj is not None:  # a head of its own already (a GGUF file's quantized one)
            return
        model.logits_proj = PackedLinear(head, None)
        if model.lm_head is not None:
            model.lm_head = None  # its weight now lives packed in logits_proj

    @staticmethod
    def decode_attention(q, k_cache, v_cache, meta, scale):
        return decode_attention_cpp(q, k_cache, v_cache, meta, scale)

    def rms_norm(self, x, weight, eps):
        if not _fast(x, weight) or x.dim() != 2:
            return super().rms_norm(x, weight, eps)
        return _extension().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if not _fast(x, residual, weight) or x.dim() != 2 or not (x.is_contiguous() and residual.is_contiguous()):
            return super().add_rms_norm(x, residual, weight, eps)
        _extension().add_rms_norm_(x, residual, weight, eps)
        return x, residual

    def rotary_and_cache(self, qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
        if not _fast(qkv, cos, k_cache) or qkv.stride(-1) != 1:
            return super().rotary_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
        _extension().rotary_cache_(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
        return split_qkv(qkv, cos.shape[-1], num_heads, num_kv_heads)

    def silu_and_mul(self, gate_up):
        if not _fast(gate_up) or gate_up.stride(-1) != 1:
            return super().silu_and_mul(gate_up)
        return _extension().silu_and_mul(gate_up)


try:
    _extension()
except Exception as exc:  # no compiler, no ninja, no headers: the reference path serves instead
    raise ImportError(f"Loom's CPU kernels could not be built: {exc}") from exc
