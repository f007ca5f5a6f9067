"""The fused CPU kernels (loom.ops.cpu_kernels.CpuOps) against the plain-PyTorch reference (loom.ops.layers.TorchOps),
op by op, on shapes that take both the serial path (decode-sized batches) and the threaded one (> 64 rows)."""

from __future__ import annotations

import pytest
import torch

from loom.ops.layers import TorchOps

cpu_kernels = pytest.importorskip("loom.ops.cpu_kernels", reason="no C++ compiler: the reference path serves")
ROWS = [1, 7, 37, 200]


@pytest.fixture(scope="module")
def ops():
    return cpu_kernels.CpuOps(), TorchOps()


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_matches_reference(ops, rows):
    fused, ref = ops
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g) * 3
    w = torch.randn(576, generator=g)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_matches_reference_and_updates_residual(ops, rows):
    fused, ref = ops
    g = torch.Generator().manual_seed(rows)
    x, residual, w = (
        torch.randn(rows, 100, generator=g),
        torch.randn(rows, 100, generator=g),
        torch.randn(100, generator=g),
    )
    want_out, want_residual = ref.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    out, new_residual = fused.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)  # one float add: exact
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_rotary_and_cache_matches_reference(ops, rows):
    fused, ref = ops
    heads, kv_heads, d, block_size, blocks = 9, 3, 64, 16, 64
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    positions = torch.randint(0, 500, (rows,), generator=g)
    angles = torch.arange(512.0)[:, None] * torch.rand(d // 2, generator=g)[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    slots = torch.randperm(blocks * block_size, generator=g)[:rows]
    caches = [torch.zeros(blocks, block_size, kv_heads, d) for _ in range(4)]

    want = ref.rotary_and_cache(qkv.clone(), positions, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    got = fused.rotary_and_cache(qkv.clone(), positions, cos, sin, caches[2], caches[3], slots, heads, kv_heads)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0)  # v is copied as is
    written = caches[2].view(-1, kv_heads, d)[slots]
    assert written.abs().sum(dim=(1, 2)).min() > 0, "every slot of the step was written"
    assert caches[2].view(-1, kv_heads, d).abs().sum(dim=(1, 2)).count_nonzero() == rows, "and no other slot"


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_reference(ops, rows):
    fused, ref = ops
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1540, generator=g) * 8  # 1540: a tail past the 8-wide vector loop
    gate_up[0, :4] = torch.tensor([-120.0, 120.0, 0.0, -1e-8])  # far tails of exp in both directions
    torch.testing.assert_close(fused.silu_and_mul(gate_up), ref.silu_and_mul(gate_up), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_gelu_and_mul_matches_reference(ops, rows):
    fused, ref = ops
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1540, generator=g) * 4  # 1540: a tail past the 8-wide vector loop
    gate_up[0, :4] = torch.tensor([-120.0, 120.0, 0.0, -1e-8])  # both tails of tanh
    torch.testing.assert_close(fused.gelu_and_mul(gate_up), ref.gelu_and_mul(gate_up), rtol=1e-5, atol=1e-5)


def test_non_float32_falls_back_to_the_reference(ops):
    fused, ref = ops
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    gate_up = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(fused.silu_and_mul(gate_up), ref.silu_and_mul(gate_up))


@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (20, None, False), (None, 2.0, False),
                                                  (45, 8.0, False), (None, None, True), (20, None, True)],
                         ids=["full", "window", "softcap", "window-softcap", "sinks", "window-sinks"])
@pytest.mark.parametrize("block_size,kv_heads,head_dim", [(16, 3, 64), (4, 2, 24), (8, 4, 64)])
def test_paged_decode_matches_gather_and_sdpa(ops, block_size, kv_heads, head_dim, window, softcap, sinks):
    """With a window, table entries of blocks wholly before it are -1 (given back): the kernel must not read them.
    Soft caps of 2 and 8 bend most scores of these inputs (|score| up to ~30); sink logits around 4 take a share of
    most rows' softmax (gpt-oss)."""
    from loom.ops.attention import AttentionMetadata

    fused, ref = ops
    g = torch.Generator().manual_seed(block_size)
    heads, blocks = kv_heads * 3, 256
    lens = [1, 5, block_size, block_size + 1, 37, 130, 300]  # partial, exact and multi-block contexts
    tables, free = [], torch.randperm(blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    for n in lens:
        released = max(0, n - window) // block_size if window else 0
        tables.append([-1 if i < released else free.pop() for i in range(-(-n // block_size))])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        num_decodes=len(lens),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        decode_seq_lens=torch.tensor(lens, dtype=torch.int32),
        prefills=[],
        block_size=block_size,
    )
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g) * 2
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 2
    scale = head_dim**-0.5
    sinks = torch.randn(heads, generator=g) * 2 + 4 if sinks else None
    got = fused.decode_attention(q, k_cache, v_cache, meta, scale, window, softcap, sinks)
    want = ref.decode_attention(q, k_cache, v_cache, meta, scale, window, softcap, sinks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if window or softcap or sinks is not None:  # the variant changes the result: a kernel ignoring it fails above
        assert (want - ref.decode_attention(q, k_cache, v_cache, meta, scale)).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["onednn", "panel"])
@pytest.mark.parametrize("rows", [1, 5, 8, 37, 130])
def test_packed_linear_matches_f_linear(backend, rows):
    from loom.ops.packed_linear import PackedLinear, packing_available, panel_available

    if backend == "panel" and not panel_available() or backend == "onednn" and not packing_available():
        pytest.skip(f"{backend} is not available on this CPU / build (the engine then uses the other backend)")
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(100, 72, generator=g), torch.randn(100, generator=g)  # 100: a partial panel
    x = torch.randn(rows, 72, generator=g)
    for b in (bias, None):
        layer = PackedLinear(weight, b, backend)
        assert layer.backend == backend
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_the_kernels_let_other_python_threads_run_while_they_compute():
    """The C++ ops release the GIL (the server's event loop streams tokens while the engine thread multiplies): a
    Python thread keeps ticking through one long panel matmul instead of stalling for all of it."""
    import threading
    import time

    from loom.ops.packed_linear import PackedLinear, panel_available

    if not panel_available():
        pytest.skip("no panel matmul in this build (oneDNN's calls are torch's, which release the GIL)")
    layer = PackedLinear(torch.randn(4096, 1024), None, "panel")
    x = torch.randn(1024, 1024)  # ~90 ms on one Zen 4 core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to the ticking thread
    try:
        layer(x)  # warm
        done, ticks = threading.Event(), []

        def tick():
            while not done.is_set():
                ticks.append(time.perf_counter())

        ticker = threading.Thread(target=tick)
        ticker.start()
        time.sleep(0.02)
        start = time.perf_counter()
        layer(x)
        took = time.perf_counter() - start
        done.set()
        ticker.join()
    finally:
        torch.set_num_threads(threads)
    # the call's edges count: held, the ticker stalls from the call's start until the kernel returns
    points = [start, *(t for t in ticks if start < t < start + took), start + took]
    longest = max(b - a for a, b in zip(points, points[1:]))
    assert took > 0.02 and longest < took / 2, (took, len(points) - 2, longest)
