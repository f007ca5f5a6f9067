"""The per-layer ops of the Llama forward pass behind one interface, so a backend can fuse them.

``TorchOps`` is the plain-PyTorch reference (any device, any dtype); ``loom.ops.cpu_kernels.CpuOps`` runs the
same contract in fused C++ kernels for float32 on CPU. The model calls only these and the matmuls:

    h = ops.rms_norm(x, w, eps)                     # first layer
    h, residual = ops.add_rms_norm(x, residual, w, eps)
    q, k, v = ops.rotary_and_cache(qkv, ...)        # rotary on q/k + writes k/v into the paged cache
    attn = paged_attention(q, k, v, ..., ops.decode_attention)
    h = ops.silu_and_mul(gate_up)

Backends may reuse their inputs' memory (``add_rms_norm`` and ``rotary_and_cache`` do in ``CpuOps``): callers
must not read an input after passing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.ops.attention import decode_attention_reference


def uninitialized_embedding(num_embeddings: int, embedding_dim: int) -> torch.nn.Embedding:
    """An ``nn.Embedding`` whose weight is left as allocated, for models built on the meta device and loaded after:
    ``nn.Embedding``'s own ``normal_`` init on meta runs through ``torch._refs``, whose first call imports
    ``torch._dynamo`` (1.1 s of a server's or a worker's start, for nothing)."""
    return torch.nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: computed in float32 whatever the dtype, so bf16 runs match the reference."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def split_qkv(
    qkv: torch.Tensor, head_dim: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, (H + 2 Hkv) D] fused projection rows -> views q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(t, num_heads, head_dim), k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchOps:
    name = "torch"
    prefill_attention = None
    """A backend's attention over all of a step's prefill chunks at once, ``(q, k_cache, v_cache, meta, scale, out,
    window, softcap, sinks=None) -> out`` (Triton's; ``meta.prefills`` are the chunks, ``meta.plans`` keeps what it
    derives once a step); None: ``loom.ops.attention`` runs the chunks one by one."""
    fused_moe = None
    """A backend's routed experts in grouped matmuls, ``(x, weights, experts, stacked, expert) -> y`` over a MoE
    layer's ``StackedExperts`` (``expert``: one of its MLPs, for the activation); None: the layer groups tokens by
    expert and runs each expert's projections (one host sync a layer for the counts)."""

    def prepare(self, model: torch.nn.Module) -> None:
        """Adapt a freshly loaded model to this backend (the reference needs nothing)."""

    def weights_changed(self, model: torch.nn.Module) -> None:
        """The model's weights were overwritten in place (``loom.models.loader.load_weights``): drop what was derived
        from them."""

    def decode_layers(self, model, x, positions, kv_caches, meta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A backend's whole stack of decoder layers over a decode-only step: ``(x, residual)`` as the model's layer
        loop leaves them, or None where the backend has no such path for this model (the loop runs)."""
        return None

    @staticmethod
    def decode_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None, sinks=None):
        return decode_attention_reference(q, k_cache, v_cache, meta, scale, window, softcap, sinks)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_reference(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x)."""
        residual = residual + x
        return rms_norm_reference(residual, weight, eps), residual

    def rotary_and_cache(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: [T, (H + 2 Hkv) D] -> q [T, H, D], k [T, Hkv, D] rotated, v [T, Hkv, D]; k and v are written
        into the cache slots (block * block_size + offset) before any attention reads them."""
        d = cos.shape[-1]
        q, k, v = split_qkv(qkv, d, num_heads, num_kv_heads)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        k_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, k)
        v_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, v)
        return q, k, v

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate, up) -> silu(gate) * up [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def clamped_swiglu(self, gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
        """[T, 2I] (gate, up) -> (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
        [T, I] (gpt-oss' experts; the checkpoint's interleaved gate/up columns are split at load)."""
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))

    def gelu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate, up) -> gelu_tanh(gate) * up [T, I] (Gemma's GeGLU)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
