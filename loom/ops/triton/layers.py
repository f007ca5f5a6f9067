"""The layer's elementwise ops in Triton, each one pass over its rows (one program per token row):
RMSNorm, the residual add fused with the next RMSNorm (vLLM's fused_add_rms_norm), rotary on q and k in place inside
the fused qkv rows together with the k/v cache write, and SiLU·mul. Same contracts as ``loom.ops.layers.TorchOps``
(float32 statistics; results rounded to the input dtype)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_r, stride_o,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if ADD:  # residual += x (rounded to the dtype, as the reference adds), then normalise the sum
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(
            x.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = (xf * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](x, x, weight, out, n, eps, x.stride(0), x.stride(0), out.stride(0),
                                    ADD=False, BLOCK=triton.next_power_of_2(n))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(RMSNorm(residual + x), residual + x), the sum written into ``residual``."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](x, residual, weight, out, n, eps, x.stride(0), residual.stride(0), out.stride(0),
                                    ADD=True, BLOCK=triton.next_power_of_2(n))
    return out, residual


@triton.jit
def tanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1), the exponent capped where float32 exp is finite: exactly +-1 in the tails."""
    return 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * x, 88.0)) + 1.0)


@triton.jit
def _gated_mul_kernel(gate_up_ptr, out_ptr, n, stride_g, stride_o, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + n + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:  # torch's gelu(approximate="tanh")
        y = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))) * up
    else:
        y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _gated_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    t, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _gated_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                  GELU=gelu)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate, up) -> silu(gate) * up [T, I]."""
    return _gated_mul(gate_up, gelu=False)


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate, up) -> gelu_tanh(gate) * up [T, I] (Gemma's GeGLU)."""
    return _gated_mul(gate_up, gelu=True)


@triton.jit
def _rotary_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_t,
                         stride_cos, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)  # 0 .. H + HKV - 1: q heads, then k heads (v heads are only copied)
    pos = tl.load(pos_ptr + token)
    half = tl.arange(0, HALF)
    row = qkv_ptr + token * stride_t + head * D
    x1 = tl.load(row + half).to(tl.float32)
    x2 = tl.load(row + HALF + half).to(tl.float32)
    c1 = tl.load(cos_ptr + pos * stride_cos + half).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + half).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_cos + half).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_cos + HALF + half).to(tl.float32)
    y1 = (x1 * c1 - x2 * s1).to(qkv_ptr.dtype.element_ty)  # rotate-half: (x1, x2) -> (-x2, x1)
    y2 = (x2 * c2 + x1 * s2).to(qkv_ptr.dtype.element_ty)
    tl.store(row + half, y1)
    tl.store(row + HALF + half, y2)
    if head >= H:
        kv = head - H
        slot = tl.load(slot_ptr + token)
        dst = slot * HKV * D + kv * D
        tl.store(k_cache_ptr + dst + half, y1)
        tl.store(k_cache_ptr + dst + HALF + half, y2)
        v_row = qkv_ptr + token * stride_t + (H + HKV + kv) * D
        tl.store(v_cache_ptr + dst + half, tl.load(v_row + half))
        tl.store(v_cache_ptr + dst + HALF + half, tl.load(v_row + HALF + half))


def rotary_and_cache_(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads: int, num_kv_heads: int) -> None:
    """Rotate q and k in place inside ``qkv`` [T, (H + 2 Hkv) D] and write k, v into the caches at ``slots``."""
    d = cos.shape[-1]
    _rotary_cache_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, positions, cos, sin, k_cache, v_cache, slots, qkv.stride(0), cos.stride(0),
        H=num_heads, HKV=num_kv_heads, D=d, HALF=d // 2,
    )  # fmt: skip
