"""``TorchOps``' contract with Triton's paged attention (``loom.ops.triton.paged_attention``): decode and all of a
step's prefill chunks read K/V in place through the block tables instead of gathering them every layer; RMSNorm
(with the residual add), rotary with the cache write and SiLU·mul / GeGLU are one kernel each
(``loom.ops.triton.layers``), so a layer is a handful of launches besides its matmuls."""

from __future__ import annotations

import torch

from loom.ops.layers import TorchOps, split_qkv


def _rows(*tensors) -> bool:
    """Row-major 2-D tensors (the kernels' layout); anything else takes the reference."""
    return all(t.dim() == 2 and t.stride(-1) == 1 for t in tensors)


class TritonOps(TorchOps):
    name = "triton"

    def prepare(self, model: torch.nn.Module) -> None:
        """Mixture-of-experts layers with float experts get them stacked for ``fused_moe``."""
        super().prepare(model)
        for module in model.modules():
            if hasattr(module, "stack_experts"):
                module.stack_experts()

    def fused_moe(self, x, weights, experts, stacked, expert):
        """The routed experts in two grouped matmuls over all (token, expert) pairs (``loom.ops.triton.moe``), the
        activation between them as the expert MLP's (SiLU·mul, GeGLU, gpt-oss' clamped SwiGLU): no host sync."""
        from loom.ops.triton import moe  # local: imports triton

        x = x.contiguous()
        top_k = experts.shape[1]
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        order = moe.align_by_expert(experts, stacked.gate_up.shape[0], moe.tile_rows(experts.numel()))
        gate_up = moe.grouped_matmul(x, stacked.gate_up, stacked.gate_up_bias, *order, top_k, per_pair=False)
        if expert.clamp is not None:
            act = self.clamped_swiglu(gate_up, *expert.clamp)
        else:
            act = self.gelu_and_mul(gate_up) if expert.gelu else self.silu_and_mul(gate_up)
        down = moe.grouped_matmul(act.contiguous(), stacked.down, stacked.down_bias, *order, top_k, per_pair=True,
                                  routing=weights.reshape(-1).contiguous())
        return down.view(x.shape[0], top_k, -1).sum(1)

    def rms_norm(self, x, weight, eps):
        if not _rows(x):
            return super().rms_norm(x, weight, eps)
        from loom.ops.triton import layers

        return layers.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if not (_rows(x, residual) and residual.is_contiguous()):
            return super().add_rms_norm(x, residual, weight, eps)
        from loom.ops.triton import layers

        return layers.add_rms_norm(x, residual, weight, eps)

    def rotary_and_cache(self, qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
        if not (_rows(qkv) and k_cache.is_contiguous() and v_cache.is_contiguous() and cos.shape[-1] % 2 == 0
                and (cos.shape[-1] & (cos.shape[-1] - 1)) == 0):  # head_dim a power of two: the kernel's tile
            return super().rotary_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
        from loom.ops.triton import layers

        layers.rotary_and_cache_(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
        return split_qkv(qkv, cos.shape[-1], num_heads, num_kv_heads)

    def silu_and_mul(self, gate_up):
        if not _rows(gate_up):
            return super().silu_and_mul(gate_up)
        from loom.ops.triton import layers

        return layers.silu_and_mul(gate_up)

    def gelu_and_mul(self, gate_up):
        if not _rows(gate_up):
            return super().gelu_and_mul(gate_up)
        from loom.ops.triton import layers

        return layers.gelu_and_mul(gate_up)

    @staticmethod
    def decode_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None, sinks=None):
        from loom.ops.triton.paged_attention import paged_decode  # local: imports triton

        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                            window=window, softcap=softcap, sinks=sinks)

    @staticmethod
    def prefill_attention(q, k_cache, v_cache, meta, scale, out, window=None, softcap=None, sinks=None):
        from loom.ops.triton.paged_attention import paged_prefill

        return paged_prefill(q, k_cache, v_cache, meta.prefills, scale, out, window, softcap, plans=meta.plans,
                             visible=meta.visible_through, sinks=sinks)
