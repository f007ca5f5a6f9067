"""The GPU path's quantized linears (``loom.ops.triton.quantized``) against the gguf package's dequantizer followed by
a plain matmul, on CPU under Triton's interpreter (compiled on a CUDA machine): every GGUF format Loom executes and
weight-only int8, through each of the three kernels (GEMV for decode rows, the tl.dot GEMM, dequantize + cuBLAS for
prefill), with a bias and an output width that is not a multiple of the tiles; float32 and bfloat16 activations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # tests/conftest.py sets it before anything imports triton; here for running this file alone too
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loom.ops.quantized import (  # noqa: E402
    BLOCK_BYTES,
    GGMLType,
    block_quants,
    dequantize_block_quants,
    dequantize_reference,
)
from loom.ops.triton import quantized as tq  # noqa: E402
from tests.engine.test_gguf_int8 import blocks  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
K = 512  # two K-quant super-blocks, sixteen 32-weight blocks
N = 70  # not a multiple of the 32 / 64 feature tiles
ROWS = {"gemv": 3, "gemv-wide": 7, "gemm": 20, "dequantize": tq.DEQUANTIZE_ROWS}
"""Rows of x per kernel: GEMV up to 4 rows with 64-wide K steps, 5-8 rows with 32-wide ones (see forward)."""


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_block_quants_spell_out_the_gguf_weights_bit_for_bit(qtype):
    qweight = blocks(qtype, rows=N, k=K, seed=3)
    bq = block_quants(qweight, qtype, K)
    assert bq.q.shape == (N, K) and bq.scale.shape == (N, K // bq.group)
    assert torch.equal(dequantize_block_quants(bq), dequantize_reference(qweight, qtype, K))
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1):  # the 4-bit packing is ggml's own nibble order for these
        layer = tq.TritonQuantLinear.from_gguf(qweight, qtype, K)
        raw = qweight.reshape(N, -1, BLOCK_BYTES[qtype])[..., -16:].reshape(N, -1)
        assert torch.equal(layer.q, raw)


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_the_dequantize_kernel_equals_the_gguf_reference(qtype):
    qweight = blocks(qtype, rows=N, k=K, seed=4)
    layer = tq.TritonQuantLinear.from_gguf(qweight, qtype, K, device=DEVICE)
    reference = dequantize_reference(qweight, qtype, K)
    torch.testing.assert_close(layer.dequantize().cpu(), reference, rtol=2e-7, atol=0)  # an FMA may round once less
    # within a bfloat16 step (the GPU rounds to nearest; Triton's interpreter truncates)
    torch.testing.assert_close(layer.dequantize(torch.bfloat16).cpu().float(), reference, rtol=2**-7, atol=0)


@pytest.mark.parametrize("kernel", list(ROWS))
@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_the_product_equals_dequantize_then_matmul(qtype, kernel):
    layer, x, expected = product_case(qtype, ROWS[kernel], seed=5)
    assert_product(layer(x.to(DEVICE)).cpu(), expected)


def product_case(qtype: GGMLType, rows: int, seed: int):
    """A layer of random blocks with a bias, float32 x of ``rows`` rows, and their product in float64."""
    torch.manual_seed(seed)
    qweight = blocks(qtype, rows=N, k=K, seed=seed)
    bias = torch.randn(N)
    layer = tq.TritonQuantLinear.from_gguf(qweight, qtype, K, bias, device=DEVICE)
    x = torch.randn(rows, K)
    expected = torch.nn.functional.linear(x.double(), dequantize_reference(qweight, qtype, K).double(), bias.double())
    return layer, x, expected


def assert_product(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", list(ROWS))
def test_bfloat16_activations_match_a_bfloat16_reference(kernel):
    torch.manual_seed(6)
    qtype = GGMLType.Q4_K
    qweight = blocks(qtype, rows=N, k=K, seed=6)
    layer = tq.TritonQuantLinear.from_gguf(qweight, qtype, K, device=DEVICE)
    x = torch.randn(ROWS[kernel], K).to(torch.bfloat16)
    weight = dequantize_reference(qweight, qtype, K).to(torch.bfloat16)
    expected = (x.double() @ weight.double().T)  # the same rounded inputs, summed exactly
    ours = layer(x.to(DEVICE)).cpu()
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("kernel", ["gemv", "gemv-wide", "gemm"])
@pytest.mark.parametrize("qtype", [GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_split_k_sums_the_same_product(qtype, kernel, splits, monkeypatch):
    """K cut into slices (8 slices of 64 inputs; 3 of 192, 192 and 128: the last one short) summed by the reduction
    kernel with the bias: the product of the unsplit kernels within float32 rounding."""
    reductions = []
    reduce = tq._split_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(partials, *args, **kwargs):
                reductions.append(tuple(partials.shape))
                return reduce[grid](partials, *args, **kwargs)
            return launch

    monkeypatch.setattr(tq, "_split_sum_kernel", Spy())
    layer, x, expected = product_case(qtype, ROWS[kernel], seed=10)
    layer.split_k = 1
    layer(x.to(DEVICE))
    assert reductions == []  # one slice: no reduction
    layer.split_k = splits
    ours = layer(x.to(DEVICE)).cpu()
    assert reductions == [(splits, ROWS[kernel], N)]
    assert_product(ours, expected)


def test_split_k_in_bfloat16_without_a_bias():
    torch.manual_seed(11)
    qweight = blocks(GGMLType.Q4_0, rows=N, k=K, seed=11)
    layer = tq.TritonQuantLinear.from_gguf(qweight, GGMLType.Q4_0, K, device=DEVICE)
    layer.split_k = 4
    x = torch.randn(2, K).to(torch.bfloat16)
    weight = dequantize_reference(qweight, GGMLType.Q4_0, K).to(torch.bfloat16)
    expected = x.double() @ weight.double().T
    ours = layer(x.to(DEVICE)).cpu()
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_split_k_is_chosen_by_how_far_the_grid_is_from_filling_the_device():
    # Llama-3-8B's 4096 -> 4096 at one row on 132 SMs: 128 programs of 32 features; 4 a SM wants 5 slices,
    # each of 832 inputs (13 steps of 64; the last slice 768)
    assert tq.split_k(128, 4096, 64, 132) == (5, 832)
    assert tq.split_k(448, 4096, 64, 132) == (2, 2048)  # 14336 features: 448 programs, 528 wanted
    assert tq.split_k(528, 4096, 64, 132) == (1, 4096)  # already 4 a SM
    assert tq.split_k(18, 576, 64, 132) == (2, 320)  # SmolLM2: 576 inputs are two slices of >= 4 steps at most
    assert tq.split_k(4, 1 << 16, 32, 132) == (16, 4096)  # at most MAX_SPLITS
    assert tq.split_k(18, 200, 64, 132) == (1, 256)  # shorter than two slices' minimum: not split
    assert tq.split_k(18, 4096, 64, 0) == (1, 4096)  # no SM count (CPU, the interpreter): not split


def test_the_plan_splits_k_on_a_cuda_device_by_its_sm_count(monkeypatch):
    """The wiring: a CUDA device's SM count reaches ``split_k`` with the grid the kernel launches (here a fake count:
    no GPU needed); ``split_k = 1`` turns it off, and CPU tensors are never split unless asked."""
    monkeypatch.setattr(tq, "_sm_count", lambda index: 132)
    monkeypatch.setattr(tq, "_INTERPRETED", False)  # the GPU's tile widths
    layer = tq.TritonQuantLinear.from_gguf(blocks(GGMLType.Q8_0, rows=4096, k=4096, seed=12), GGMLType.Q8_0, 4096)
    cuda = torch.device("cuda", 0)
    kernel, grid, splits, per, options = layer.plan(1, cuda, torch.bfloat16)
    assert (kernel, grid, splits, per, options["BLOCK_K"]) == (tq._gemv_kernel, (128,), 5, 832, 64)
    kernel, grid, splits, per, _ = layer.plan(16, cuda, torch.bfloat16)  # 64 programs of 16 x 64, 32-wide K steps
    assert (kernel, grid, splits, per) == (tq._gemm_kernel, (1, 64), 9, 480)
    assert layer.plan(1, torch.device("cpu"), torch.bfloat16)[2] == 1
    layer.split_k = 1
    assert layer.plan(1, cuda, torch.bfloat16)[2:4] == (1, 4096)


def test_leading_dimensions_are_kept():
    qweight = blocks(GGMLType.Q8_0, rows=N, k=K, seed=7)
    layer = tq.TritonQuantLinear.from_gguf(qweight, GGMLType.Q8_0, K, device=DEVICE)
    x = torch.randn(2, 3, K, device=DEVICE)
    torch.testing.assert_close(layer(x), layer(x.reshape(6, K)).reshape(2, 3, N))


@pytest.mark.parametrize("kernel", list(ROWS))
def test_weight_only_int8_equals_its_per_feature_reference(kernel):
    torch.manual_seed(8)
    weight = torch.randn(N, 96) * torch.linspace(0.1, 2.0, N)[:, None]  # a different scale for every feature
    bias = torch.randn(N)
    layer = tq.TritonQuantLinear.from_float(weight.to(DEVICE), bias.to(DEVICE))
    scale = weight.abs().amax(1, keepdim=True) / 127
    q = torch.round(weight / scale).clamp(-127, 127)
    assert torch.equal(layer.q.cpu(), q.to(torch.int8))
    x = torch.randn(ROWS[kernel], 96)
    expected = torch.nn.functional.linear(x.double(), (q * scale).double(), bias.double())
    torch.testing.assert_close(layer(x.to(DEVICE)).cpu().double(), expected, rtol=0,
                               atol=2e-6 * expected.abs().max().item())
    # and near the float weights: int8 rounding is at most half a step per weight
    assert (layer.dequantize().cpu() - weight).abs().max() <= scale.max() / 2 + 1e-6


def test_a_gguf_file_runs_through_the_triton_kernels_as_transformers_expands_it(tmp_path, smollm2_path):
    """A tiny qwen2 GGUF (Q8_0 q/k/v with biases, Q4_1 o/gate/up, Q4_0 down) through the engine with the triton
    backend: every projection a ``TritonQuantLinear``, greedy ids and logprobs as transformers' float32 expansion,
    over a 16-token chunked prefill (max_num_batched_tokens) and decode steps of several rows."""
    from transformers import AutoModelForCausalLM

    from loom import LLM
    from tests.engine.test_gguf_archs import VOCAB, write_tiny_gguf
    from tests.engine.test_gguf_kquants import hf_greedy
    from tests.engine.test_parity import assert_parity, loom_greedy

    path = tmp_path / "tiny-qwen2.gguf"
    write_tiny_gguf(path, "qwen2")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 6, 19, 30)]
    reference = hf_greedy(hf, prompts, max_new=5)
    llm = LLM(str(path), tokenizer=str(smollm2_path), attention_backend="triton", num_kv_blocks=64,
              max_num_batched_tokens=16, dtype="float32")  # "auto" is bfloat16 on CUDA: the reference is float32
    layer = llm.engine.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, tq.TritonQuantLinear) and layer.self_attn.qkv_proj.kind == "Q8_0"
    assert layer.mlp.down_proj.kind == "Q4_0" and layer.self_attn.qkv_proj.bias is not None
    assert_parity(loom_greedy(llm, prompts, 5), reference)


def test_weight_only_int8_through_the_engine_equals_its_dequantized_weights(tiny_llama):
    """``quantization="int8"`` with the triton kernels (weight-only: activations stay float) gives exactly what the
    plain-PyTorch engine gives with every projection and the head replaced by the int8 weights dequantized."""
    from loom import LLM
    from loom.ops.quantized import QUANTIZED_PROJECTIONS
    from tests.engine.test_parity import assert_parity, loom_greedy

    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=16, dtype="float32")  # also on CUDA
    int8 = LLM(str(tiny_llama), quantization="int8", attention_backend="triton", **engine)
    reference = LLM(str(tiny_llama), attention_backend="torch", **engine)
    ours_model, ref_model = int8.engine.model, reference.engine.model
    replaced = 0
    with torch.no_grad():
        for ours_layer, ref_layer in zip(ours_model.layers, ref_model.layers):
            for part in (ours_layer.self_attn, ours_layer.mlp):
                for name in QUANTIZED_PROJECTIONS:
                    if isinstance(getattr(part, name, None), tq.TritonQuantLinear):
                        ref_part = ref_layer.self_attn if part is ours_layer.self_attn else ref_layer.mlp
                        getattr(ref_part, name).weight.copy_(getattr(part, name).dequantize())
                        replaced += 1
        head = ref_model.lm_head.weight if ref_model.lm_head is not None else ref_model.embed_tokens.weight
        if ref_model.lm_head is None:  # a tied head: give the reference a head of its own with the int8 weights
            ref_model.logits_proj = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, device=head.device,
                                                    dtype=head.dtype)
            ref_model.logits_proj.weight.copy_(ours_model.logits_proj.dequantize())
        else:
            head.copy_(ours_model.logits_proj.dequantize())
    assert replaced == 4 * len(ours_model.layers) and isinstance(ours_model.logits_proj, tq.TritonQuantLinear)
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 20)]
    assert_parity(loom_greedy(int8, prompts, 5), loom_greedy(reference, prompts, 5), atol=1e-4)
