"""Triton's layer ops (loom.ops.triton.layers via TritonOps) against the plain-PyTorch reference (TorchOps), on CPU
under Triton's interpreter (on a CUDA machine they compile): RMSNorm, residual add + RMSNorm, rotary + cache write,
SiLU·mul and GeGLU, in float32 and bfloat16, on an odd hidden size."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # tests/conftest.py sets it before anything imports triton; here for running this file alone too
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loom.ops.layers import TorchOps  # noqa: E402
from loom.ops.rotary import RotaryEmbedding  # noqa: E402
from loom.ops.triton_ops import TritonOps  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
CASES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("dtype, tol", CASES)
def test_norms_and_silu_mul_equal_the_reference(dtype, tol):
    torch.manual_seed(0)
    triton_ops, reference = TritonOps(), TorchOps()
    x = torch.randn(7, 96, device=DEVICE).to(dtype)
    residual = torch.randn(7, 96, device=DEVICE).to(dtype)
    weight = torch.rand(96, device=DEVICE).to(dtype) + 0.5
    torch.testing.assert_close(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6),
                               atol=tol, rtol=tol)
    expected_out, expected_sum = reference.add_rms_norm(x, residual.clone(), weight, 1e-6)
    in_place = residual.clone()
    out, summed = triton_ops.add_rms_norm(x, in_place, weight, 1e-6)
    assert summed.data_ptr() == in_place.data_ptr()  # the sum lands in the residual buffer
    torch.testing.assert_close(summed, expected_sum, atol=tol, rtol=tol)
    torch.testing.assert_close(out, expected_out, atol=tol, rtol=tol)
    gate_up = torch.randn(5, 2 * 300, device=DEVICE).to(dtype) * 3
    gate_up[0, :3] = torch.tensor([-60.0, 60.0, 0.0])  # the tails of exp and tanh
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=tol, rtol=tol)
    torch.testing.assert_close(triton_ops.gelu_and_mul(gate_up), reference.gelu_and_mul(gate_up), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", CASES)
def test_rotary_and_cache_write_equal_the_reference(dtype, tol):
    torch.manual_seed(1)
    heads, kv_heads, d, block_size, num_blocks, tokens = 6, 2, 16, 4, 8, 5
    rotary = RotaryEmbedding(d, 64, 10000.0, None, dtype).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device=DEVICE).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 63], device=DEVICE)
    slots = torch.tensor([5, 9, 2, 30, 17], device=DEVICE)
    caches = {}
    for name, ops in (("triton", TritonOps()), ("reference", TorchOps())):
        k_cache = torch.zeros(num_blocks, block_size, kv_heads, d, device=DEVICE, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q, k, v = ops.rotary_and_cache(qkv.clone(), positions, rotary.cos, rotary.sin, k_cache, v_cache, slots,
                                       heads, kv_heads)
        caches[name] = (q, k, v, k_cache, v_cache)
    for ours, expected in zip(caches["triton"], caches["reference"]):
        torch.testing.assert_close(ours, expected, atol=tol, rtol=tol)
