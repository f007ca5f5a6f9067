"""Triton's paged attention (decode, and every prefill chunk of a step in one launch) against the plain-PyTorch
reference, on CPU under Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported; on a CUDA machine the kernels compile and run on the GPU):
GQA, contexts shorter than a block and longer than several splits, shuffled block tables, float32 and bfloat16;
and a tiny model's greedy outputs through the engine with attention_backend="triton"."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # tests/conftest.py sets it before anything imports triton; here for running this file alone too
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loom import LLM  # noqa: E402
from loom.ops.attention import AttentionMetadata, PrefillChunk, decode_attention_reference  # noqa: E402
from loom.ops.attention import prefill_attention as prefill_reference  # noqa: E402
from loom.ops.triton.paged_attention import paged_decode, paged_prefill  # noqa: E402
from tests.engine.test_parity import loom_greedy, varied_prompts  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (9, 3)])
def test_paged_decode_equals_the_reference(dtype, atol, heads, kv_heads):
    torch.manual_seed(heads + kv_heads)
    num_blocks, block_size, d = 48, 8, 16
    k = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    lens = torch.tensor([1, 5, 8, 70, 150], dtype=torch.int32, device=DEVICE)  # 150 tokens: 19 blocks, 5 splits
    tables = torch.stack([torch.randperm(num_blocks)[:19] for _ in lens]).to(torch.int32).to(DEVICE)
    q = torch.randn(len(lens), heads, d, device=DEVICE).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[], block_size=block_size)
    reference = decode_attention_reference(q.float(), k.float(), v.float(), meta, 0.3)
    out = paged_decode(q, k, v, tables, lens, 0.3, blocks_per_split=4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=atol, rtol=atol)


def test_all_prefill_chunks_of_a_step_in_one_launch_equal_the_reference():
    """Chunks with and without a cached prefix, shorter and longer than a query tile, one of a single token; GQA."""
    torch.manual_seed(1)
    heads, kv_heads, d, block_size, num_blocks = 6, 2, 16, 8, 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE)
    free = torch.randperm(num_blocks).tolist()
    chunks, row = [], 0
    for start, n in [(0, 20), (16, 11), (0, 1), (37, 40)]:
        count = -(-(start + n) // block_size)
        table, free = torch.tensor(free[:count], device=DEVICE), free[count:]
        chunks.append(PrefillChunk(row, row + n, start, table))
        row += n
    q = torch.randn(row, heads, d, device=DEVICE)
    out = paged_prefill(q, k_cache, v_cache, chunks, 0.25)
    for c in chunks:  # the reference takes the chunk's own keys as given; here they are the cache's
        keys = k_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + c.token_end - c.token_start]
        values = v_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + c.token_end - c.token_start]
        expected = prefill_reference(q[c.token_start : c.token_end], keys, values, k_cache, v_cache, c, 0.25)
        torch.testing.assert_close(out[c.token_start : c.token_end], expected, atol=1e-5, rtol=1e-5)


def test_engine_with_triton_attention_gives_the_reference_tokens(tiny_llama):
    """Decode and prefill through the kernels: 16-token steps chunk the prompts, the last one hits the prefix cache."""
    shared = varied_prompts(1, seed=6, low=24, high=24)[0]
    prompts = varied_prompts(3, seed=4, low=5, high=40) + [shared + [101, 102], shared + [103]]
    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)
    reference = loom_greedy(LLM(str(tiny_llama), attention_backend="torch", **engine), prompts, 8)
    triton_llm = LLM(str(tiny_llama), attention_backend="triton", **engine)
    ours = loom_greedy(triton_llm, prompts, 8)
    assert triton_llm.engine.stats().prefix_hit_rate > 0
    assert [o[0] for o in ours] == [r[0] for r in reference]
    for (_, lps), (_, ref) in zip(ours, reference):
        assert max(abs(a - b) for a, b in zip(lps, ref)) < 1e-4
