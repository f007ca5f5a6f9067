"""Fused CPU kernels (``loom.ops.cpp_extension``, compiled on first use) behind ``TorchOps``' contract. Importing
this module raises ImportError when the kernels cannot be built, and the engine falls back to the plain-PyTorch
reference (``loom.ops.layers.TorchOps``)."""

from __future__ import annotations

import torch

from loom.ops.attention import AttentionMetadata, decode_attention_reference
from loom.ops.cpp_extension import extension as _extension
from loom.ops.cpp_extension import gguf_extension
from loom.ops.layers import TorchOps, split_qkv
from loom.ops.packed_linear import PackedLinear, pack_linears, packing_available, panel_available
from loom.ops.quantized import INT8_ROWS, GGUFLinear, Int8Linear


def _fast(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def decode_attention_cpp(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``decode_attention_reference``; float32 CPU tensors take the fused kernel."""
    if not _fast(q) or (sinks is not None and not _fast(sinks)):
        return decode_attention_reference(q, k_cache, v_cache, meta, scale, window, softcap, sinks)
    return _extension().paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                     window or 0, softcap or 0.0, sinks)


class CpuOps(TorchOps):
    """``TorchOps``' contract in fused kernels for float32 CPU tensors; anything else takes the reference."""

    name = "cpp"
    _decode_plan: list[tuple] | tuple | None = None
    """``decode_layers``' per-layer arguments, () where the model has layers it does not compute; None: not yet
    looked at."""

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

    def weights_changed(self, model: torch.nn.Module) -> None:
        self._decode_plan = None  # oneDNN's packed weights are new tensors; the plan is made again at the next step

    def decode_layers(self, model, x, positions, kv_caches, meta):
        """Dense layers of the Llama family, Qwen3, Mistral, Phi-3 and Gemma 2 / 3 (q/k norms, sliding windows,
        soft-capping, GeGLU and Gemma's sandwich norms included) whose projections are panel-packed float32 or
        int8-executed quantized (a GGUF file's, ``--quantization int8``, GPTQ / AWQ folders' — act-order inputs
        gathered inside the call): one C++ call each (``decode_layer`` /
        ``gguf_decode_layer`` chain this class's ops with the matmul), so a decode step does not return to Python
        between ops. Any other model (MoE, tensor parallelism, LoRA, oneDNN weights, a projection of mixed GGUF
        types): None, and the layers run one op at a time."""
        if self._decode_plan is None:  # at the first decode step: LoRA wraps the projections after prepare
            self._decode_plan = _layer_plan(model) or ()
        if not self._decode_plan or not _fast(x):
            return None
        residual = None
        for (layer, norms, weights, shapes, eps, rotary, attention, variant), (k_cache, v_cache) in zip(
                self._decode_plan, kv_caches):
            x, residual = layer(x, residual, norms, weights, shapes, eps, positions, rotary.cos, rotary.sin, k_cache,
                                v_cache, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens, *attention,
                                *variant)
        return x, residual

    @staticmethod
    def decode_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None, sinks=None):
        return decode_attention_cpp(q, k_cache, v_cache, meta, scale, window, softcap, sinks)

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

    def gelu_and_mul(self, gate_up):
        if not _fast(gate_up) or gate_up.stride(-1) != 1 or gate_up.dim() != 2:
            return super().gelu_and_mul(gate_up)
        return _extension().gelu_and_mul(gate_up)


def _layer_plan(model: torch.nn.Module) -> list[tuple] | None:
    """Per layer, the arguments of its C++ layer call besides the step's tensors; None unless every layer is one that
    call computes exactly: a dense MLP (SwiGLU or GeGLU), norms of one eps, no tensor parallelism, and its four
    projections all panel-packed or all int8-executed."""
    if model.tp is not None:
        return None
    plan = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):  # DeepSeek's latent attention
            return None
        if not hasattr(mlp, "gate_up_proj") or mlp.tp is not None or attn.tp is not None:  # MoE: experts
            return None
        if layer.post_norms or attn.qk_norm_full:  # OLMo 2's norms after the branches, over all heads
            return None
        if attn.sinks is not None or mlp.clamp is not None or attn.clip_qkv is not None:  # not in the call
            return None
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if layer.sandwich:  # Gemma
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if attn.q_norm is not None:  # Qwen3, Gemma 3
            norms += [attn.q_norm, attn.k_norm]
        if len({n.eps for n in norms}) > 1 or not _fast(*(n.weight for n in norms)):
            return None
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        formats = [_int8_format(p) for p in projections]
        weights, shapes = [], []
        if all(type(p) is PackedLinear and p.backend == "panel" for p in projections):
            call = _extension().decode_layer  # built wherever the panel matmul is
            for p in projections:
                weights += [p.packed_weight, p.bias]
                shapes.append(p.out_features)
        elif None not in formats:
            call = gguf_extension().gguf_decode_layer
            gathered = [_gathered(p) for p in projections]
            with_orders = any(order is not None for order in gathered)  # then each projection's order, or None
            for p, fmt, order in zip(projections, formats, gathered):
                p = p.layer if order is not None else p
                weights += [p.qs, p.scales, p.mins, p.bias] + ([order] if with_orders else [])
                shapes += [fmt, p.out_features]
        else:
            return None
        rotary = model.rotary_of(i)  # Gemma 3's sliding layers: their own rope base
        attention = (attn.num_heads, attn.num_kv_heads, attn.scale)
        variant = (attn.window or 0, attn.softcap or 0.0, mlp.gelu, layer.sandwich)
        plan.append((call, [n.weight.detach() for n in norms], weights, shapes, norms[0].eps, rotary, attention,
                     variant))
    return plan


def _gathered(proj: torch.nn.Module) -> torch.Tensor | None:
    """The input order of a projection that reads its input's columns in an order of its own (GPTQ's act-order:
    ``loom.models.int_quant.GatheredInputs``, holding the quantized ``layer`` and its ``order``), else None."""
    return proj.order if type(proj).__name__ == "GatheredInputs" else None


def _int8_format(proj: torch.nn.Module) -> int | None:
    """The int8 kernels' format of a projection they execute (a GGUF type or weight-only int8's; an act-order
    projection's inner layer's), else None."""
    if _gathered(proj) is not None:
        proj = proj.layer
    if type(proj) is Int8Linear:
        return INT8_ROWS
    if type(proj) is GGUFLinear and proj.activations == "int8":
        return int(proj.qtype)
    return None


try:
    _extension()
except Exception as exc:  # no compiler, no ninja, no headers: the reference path serves instead
    raise ImportError(f"Loom's CPU kernels could not be built: {exc}") from exc
