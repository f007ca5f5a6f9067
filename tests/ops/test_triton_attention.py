"""Triton's paged attention (decode, and every prefill chunk of a step in one launch) against the plain-PyTorch
reference, on CPU under Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported; on a CUDA machine the kernels compile and run on the GPU):
GQA, contexts shorter than a block and longer than several splits, shuffled block tables, float32 and float16
(bfloat16 on a GPU);
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


# 16-bit operands: float16 everywhere; bfloat16 on a GPU only (Triton's interpreter gets bfloat16 tl.dot wrong)
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)] + ([(torch.bfloat16, 2e-2)] if CUDA else [])


@pytest.mark.parametrize("dtype, atol", DTYPES)
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


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("heads", [16, 40])
def test_latent_attention_shapes_equal_the_reference(dtype, atol, heads):
    """DeepSeek's MLA as the kernels see it: query heads on one KV head 576 wide (latent 512 + rotary 64, tiled as
    1024), the keys' cache passed as the values' (``loom.models.llama.LatentAttention``): 16 heads in one tile of
    a program (DeepSeek-V2-Lite), 40 in three (``WIDE_HEAD_TILE``; the last one partly idle). Decode, then a step's
    prefill chunks, one with a cached prefix."""
    torch.manual_seed(5)
    num_blocks, block_size, d, scale = 24, 16, 576, 192**-0.5
    cache = (torch.randn(num_blocks, block_size, 1, d, device=DEVICE) * 0.1).to(dtype)
    lens = torch.tensor([1, 17, 90], dtype=torch.int32, device=DEVICE)
    tables = torch.stack([torch.randperm(num_blocks)[:6] for _ in lens]).to(torch.int32).to(DEVICE)
    q = torch.randn(len(lens), heads, d, device=DEVICE).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[], block_size=block_size)
    reference = decode_attention_reference(q.float(), cache.float(), cache.float(), meta, scale)
    out = paged_decode(q, cache, cache, tables, lens, scale, blocks_per_split=2)
    torch.testing.assert_close(out.float(), reference, atol=atol, rtol=atol)

    blocks = torch.randperm(num_blocks).tolist()
    chunks = [PrefillChunk(0, 5, 0, torch.tensor(blocks[:1], device=DEVICE)),
              PrefillChunk(5, 12, 20, torch.tensor(blocks[1:3], device=DEVICE))]
    q = torch.randn(12, heads, d, device=DEVICE).to(dtype)
    out = paged_prefill(q, cache, cache, chunks, scale).float()
    latent = cache.float()
    for c in chunks:
        own = latent[c.block_table].view(-1, 1, d)[c.start_pos : c.start_pos + c.token_end - c.token_start]
        expected = prefill_reference(q[c.token_start : c.token_end].float(), own, own, latent, latent, c, scale)
        torch.testing.assert_close(out[c.token_start : c.token_end], expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("window,softcap,sinks", [(20, None, False), (None, 2.0, False), (45, 8.0, False),
                                                  (None, None, True), (20, None, True)],
                         ids=["window", "softcap", "window-softcap", "sinks", "window-sinks"])
def test_paged_decode_with_a_window_and_soft_caps_equals_the_reference(window, softcap, sinks):
    """Table entries of blocks wholly before the window are -1 (given back): the kernel must not read them. Sinks
    (gpt-oss) join the softmax after the splits are combined."""
    torch.manual_seed(3)
    num_blocks, block_size, heads, kv_heads, d = 128, 8, 6, 2, 16
    k = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE) * 2
    v = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE)
    lens = [1, 7, 8, 21, 70, 150]
    free, rows = torch.randperm(num_blocks).tolist(), []
    for n in lens:
        released = max(0, n - window) // block_size if window else 0
        rows.append([-1 if i < released else free.pop() for i in range(19)])
    tables = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), heads, d, device=DEVICE) * 2
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[], block_size=block_size)
    sinks = torch.randn(heads, device=DEVICE) * 2 + 4 if sinks else None
    reference = decode_attention_reference(q, k, v, meta, 0.3, window, softcap, sinks)
    out = paged_decode(q, k, v, tables, lens, 0.3, blocks_per_split=4, window=window, softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (reference - decode_attention_reference(q, k, v, meta, 0.3)).abs().max() > 1e-2  # the variant matters


@pytest.mark.parametrize("window", [None, 20], ids=["full", "window"])
def test_decode_splits_without_keys_are_neither_written_nor_read(monkeypatch, window):
    """The split partials are not filled: a split past a row's context (or wholly before its window) skips its
    stores, and the combine reads only the splits that saw keys. Allocations poisoned with NaN catch either half
    missing (a NaN read anywhere reaches the output)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.manual_seed(5)
    num_blocks, block_size, heads, kv_heads, d = 64, 8, 6, 2, 16
    k = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE)
    v = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE)
    lens = torch.tensor([1, 9, 33, 150], dtype=torch.int32, device=DEVICE)  # 1, 1, 2 and 5 of 5 splits
    tables = torch.stack([torch.randperm(num_blocks)[:19] for _ in lens]).to(torch.int32).to(DEVICE)
    q = torch.randn(len(lens), heads, d, device=DEVICE)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[], block_size=block_size)
    reference = decode_attention_reference(q, k, v, meta, 0.3, window)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = paged_decode(q, k, v, tables, lens, 0.3, blocks_per_split=4, window=window)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (12, None, False), (None, 2.0, False),
                                                  (30, 8.0, False), (None, None, True), (12, None, True)],
                         ids=["full", "window", "softcap", "window-softcap", "sinks", "window-sinks"])
def test_all_prefill_chunks_of_a_step_in_one_launch_equal_the_reference(window, softcap, sinks, dtype, atol, heads,
                                                                          kv_heads):
    """Chunks with and without a cached prefix, shorter and longer than a query tile, one of a single token; GQA
    (the kernel packs a KV head's G query heads into one tile's rows) and MHA.
    With a window, blocks no query of a chunk sees are -1 in its table (given back), as the block manager leaves
    them."""
    torch.manual_seed(1)
    d, block_size, num_blocks = 16, 8, 64  # query heads packed G to a KV head in the kernel's tiles: G = 3, 1, 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    free = torch.randperm(num_blocks).tolist()
    chunks, row = [], 0
    for start, n in [(0, 20), (16, 11), (0, 1), (37, 40)]:
        count = -(-(start + n) // block_size)
        released = max(0, start - window + 1) // block_size if window else 0
        table = torch.tensor([-1] * released + free[released:count], device=DEVICE)
        free = free[count:]
        chunks.append(PrefillChunk(row, row + n, start, table))
        row += n
    q = (torch.randn(row, heads, d, device=DEVICE) * 2).to(dtype)
    sinks = (torch.randn(heads, device=DEVICE) * 2 + 3).to(dtype) if sinks else None
    out = paged_prefill(q, k_cache, v_cache, chunks, 0.25, window=window, softcap=softcap, sinks=sinks).float()
    sinks = None if sinks is None else sinks.float()
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()  # the reference in float32 on the same values
    for c in chunks:  # the reference takes the chunk's own keys as given; here they are the cache's
        keys = k_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + c.token_end - c.token_start]
        values = v_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + c.token_end - c.token_start]
        rows = q[c.token_start : c.token_end]
        expected = prefill_reference(rows, keys, values, k_cache, v_cache, c, 0.25, window, softcap, sinks=sinks)
        torch.testing.assert_close(out[c.token_start : c.token_end], expected, atol=atol, rtol=atol)
        if (window or softcap) and c.token_end - c.token_start > 16:  # the variant matters
            plain = prefill_reference(rows, keys, values, k_cache, v_cache, c, 0.25)
            assert (expected - plain).abs().max() > 1e-2
        if sinks is not None:  # and so do the sinks
            sinkless = prefill_reference(rows, keys, values, k_cache, v_cache, c, 0.25, window, softcap)
            assert (expected - sinkless).abs().max() > 1e-2


def span_mask(length: int, spans: list[tuple[int, int]], window: int | None) -> torch.Tensor:
    """[length, length] bool, as transformers' Gemma 3 masks a prompt: causal OR (both tokens in one image span),
    then AND the window (k > q - window)."""
    group = torch.full((length,), -1)
    for i, (s, e) in enumerate(spans):
        group[s:e] = i
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = (k <= q) | ((group[:, None] == group[None, :]) & (group[:, None] >= 0))
    return mask & (k > q - window) if window else mask


def visible_through(length: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.arange(length)
    for s, e in spans:
        out[s:e] = e - 1
    return out.to(torch.int32)


@pytest.mark.parametrize("window", [None, 12], ids=["full", "window"])
def test_prefill_with_bidirectional_spans_equals_a_brute_force_mask(window):
    """The reference's ``visible``: a query inside a span (a Gemma 3 image) sees the whole span, keys after it
    included, in a chunk from position 0 and in one after a cached prefix (a span that starts inside the prefix)."""
    torch.manual_seed(7)
    heads, kv_heads, d, block_size, length = 4, 2, 8, 8, 40
    spans = [(3, 9), (14, 24), (30, 33)]
    q, k, v = torch.randn(length, heads, d), torch.randn(length, kv_heads, d), torch.randn(length, kv_heads, d)
    mask = span_mask(length, spans, window)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    expected = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~mask, float("-inf")), -1),
                            v.repeat_interleave(2, dim=1))
    k_cache = torch.zeros(8, block_size, kv_heads, d)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([5, 1, 7, 0, 2])
    k_cache[table] = k.view(5, block_size, kv_heads, d)
    v_cache[table] = v.view(5, block_size, kv_heads, d)
    visible = visible_through(length, spans)
    for start in (0, 18):  # 18: inside the second span, whose first keys are cached
        chunk = PrefillChunk(0, length - start, start, table)
        out = prefill_reference(q[start:], k[start:], v[start:], k_cache, v_cache, chunk, 0.3, window,
                                visible=visible[start:])
        torch.testing.assert_close(out, expected[start:], atol=1e-5, rtol=1e-5)
    causal = prefill_reference(q, k, v, k_cache, v_cache, PrefillChunk(0, length, 0, table), 0.3, window)
    assert (causal - expected).abs().max() > 1e-2  # the spans matter


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("window", [None, 12], ids=["full", "window"])
def test_prefill_launch_with_bidirectional_spans_equals_the_reference(window, dtype, atol):
    """Three chunks in one launch, one without a span, one whose span crosses query tiles, one after a cached prefix
    that cuts a span; the span's rows see keys past the tile's (and the chunk's causal) end."""
    torch.manual_seed(2)
    heads, kv_heads, d, block_size, num_blocks = 6, 2, 16, 8, 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, device=DEVICE).to(dtype)
    free = torch.randperm(num_blocks).tolist()
    chunks, row, visible = [], 0, []
    for start, n, spans in [(0, 30, []), (0, 45, [(2, 7), (9, 40)]), (16, 30, [(10, 25), (38, 44)])]:
        count = -(-(start + n) // block_size)
        chunks.append(PrefillChunk(row, row + n, start, torch.tensor(free[:count], device=DEVICE)))
        free = free[count:]
        visible.append(visible_through(start + n, spans)[start:])
        row += n
    visible = torch.cat(visible).to(DEVICE)
    q = (torch.randn(row, heads, d, device=DEVICE) * 2).to(dtype)
    out = paged_prefill(q, k_cache, v_cache, chunks, 0.25, window=window, visible=visible).float()
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    for c in chunks:
        n = c.token_end - c.token_start
        keys = k_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + n]
        values = v_cache[c.block_table].view(-1, kv_heads, d)[c.start_pos : c.start_pos + n]
        expected = prefill_reference(q[c.token_start : c.token_end], keys, values, k_cache, v_cache, c, 0.25, window,
                                     visible=visible[c.token_start : c.token_end])
        torch.testing.assert_close(out[c.token_start : c.token_end], expected, atol=atol, rtol=atol)
    causal = paged_prefill(q, k_cache, v_cache, chunks, 0.25, window=window)
    assert (causal - out).abs().max() > 1e-2


def test_a_cache_past_int32_offsets_is_refused_not_misread():
    """The kernels' int32 offsets address 2**31 elements of a layer's cache: a larger one is a clear error (here on
    meta tensors: nothing allocated, nothing launched)."""
    q = torch.empty(2, 4, 64, device="meta")
    big = torch.empty(2**31 // (16 * 2 * 64), 16, 2, 64, device="meta")  # exactly 2**31 elements
    tables, lens = torch.empty(2, 8, dtype=torch.int32, device="meta"), torch.empty(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="int32 offsets"):
        paged_decode(q, big, big, tables, lens, 0.125)
    with pytest.raises(ValueError, match="int32 offsets"):
        paged_prefill(q, big, big, [], 0.125)
    small = torch.empty(2**31 // (16 * 2 * 64) - 1, 16, 2, 64, device="meta")
    assert paged_decode(torch.empty(0, 4, 64, device="meta"), small, small, tables, lens, 0.125).shape == (0, 4, 64)


def test_engine_with_triton_attention_gives_the_reference_tokens(tiny_llama, monkeypatch):
    """Decode and prefill through the kernels: 16-token steps chunk the prompts, the last one hits the prefix cache.
    The prefill launch's integers are built once a step and read by every layer."""
    from loom.ops.triton import paged_attention

    calls = {"plan": 0, "prefill": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(paged_attention, "prefill_plan", counted("plan", paged_attention.prefill_plan))
    monkeypatch.setattr(paged_attention, "paged_prefill", counted("prefill", paged_attention.paged_prefill))
    shared = varied_prompts(1, seed=6, low=24, high=24)[0]
    prompts = varied_prompts(3, seed=4, low=5, high=40) + [shared + [101, 102], shared + [103]]
    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16, dtype="float32")  # also on CUDA
    reference = loom_greedy(LLM(str(tiny_llama), attention_backend="torch", **engine), prompts, 8)
    triton_llm = LLM(str(tiny_llama), attention_backend="triton", **engine)
    ours = loom_greedy(triton_llm, prompts, 8)
    layers = triton_llm.engine.model.config.num_hidden_layers
    assert layers > 1 and calls["plan"] > 0 and calls["prefill"] == layers * calls["plan"]
    assert triton_llm.engine.stats().prefix_hit_rate > 0
    assert [o[0] for o in ours] == [r[0] for r in reference]
    for (_, lps), (_, ref) in zip(ours, reference):
        assert max(abs(a - b) for a, b in zip(lps, ref)) < 1e-4
    # the GPU path with async scheduling: pending tokens fed into the Triton step's inputs
    ahead = loom_greedy(LLM(str(tiny_llama), attention_backend="triton", async_scheduling=True, **engine), prompts, 8)
    assert [o[0] for o in ahead] == [r[0] for r in reference]


@pytest.mark.parametrize("arch,overrides", [
    ("mistral", {"sliding_window": 20, "head_dim": 16}),  # every layer windowed: blocks behind it given back (-1)
    ("gemma2", {"attn_logit_softcapping": 1.0}),  # alternate 16-token windows, soft caps that bend the scores
    ("gpt_oss", {}),  # alternate 16-token windows, attention sinks in decode and prefill
    ("deepseek_v3", {}),  # latent attention: one 40-wide KV head for 4 query heads, its cache the values' too
], ids=["mistral-window", "gemma2-softcap", "gpt-oss-sinks", "deepseek-v3-latent"])  # fmt: skip
def test_windowed_and_soft_capped_models_through_triton_give_the_reference_tokens(tmp_path, smollm2_path, arch,
                                                                                   overrides):
    """Prompts past the window, chunked over 16-token steps, decoding 12 tokens further."""
    from tests.conftest import save_tiny_model

    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides)
    prompts = varied_prompts(3, seed=9, low=20, high=45)
    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16, dtype="float32")  # also on CUDA
    reference = loom_greedy(LLM(str(path), attention_backend="torch", **engine), prompts, 12)
    ours = loom_greedy(LLM(str(path), attention_backend="triton", **engine), prompts, 12)
    assert [o[0] for o in ours] == [r[0] for r in reference]
    for (_, lps), (_, ref) in zip(ours, reference):
        assert max(abs(a - b) for a, b in zip(lps, ref)) < 1e-4
