"""``TorchOps``' contract with Triton's paged attention (``loom.ops.triton.paged_attention``): decode and all of a
step's prefill chunks read K/V in place through the block tables instead of gathering them every layer.
The other ops keep the reference implementations for now (fused norm / rotary / SiLU kernels are the next step)."""

from __future__ import annotations

from loom.ops.layers import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    @staticmethod
    def decode_attention(q, k_cache, v_cache, meta, scale):
        from loom.ops.triton.paged_attention import paged_decode  # local: imports triton

        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)

    @staticmethod
    def prefill_attention(q, k_cache, v_cache, chunks, scale, out):
        from loom.ops.triton.paged_attention import paged_prefill

        return paged_prefill(q, k_cache, v_cache, chunks, scale, out)
