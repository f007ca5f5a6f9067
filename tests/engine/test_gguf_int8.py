"""GGUF weights multiplied by int8 dot products (llama.cpp's arithmetic), and weight-only int8 for HF folders
(``--quantization int8``) on the same kernels: activations quantized per 32 inputs to int8, the weights in 16-feature
tiles for vpdpbusd (AVX-512 VNNI), vpmaddubsw (AVX2) or plain loops.

Each path is held to the same reference, computed here in float64 from the gguf package's dequantizer and this
file's own per-32 activation quantization: repacking loses nothing (its unpacking equals gguf's dequantization
bit for bit), the activations are quantized exactly as the reference does, and the products agree to float32
rounding. The reference with float32 activations differs by ~0.5% of the outputs' size, so a kernel that skipped or
misplaced the activation quantization, or read a quant from the wrong lane, fails by orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.ops.cpp_extension import gguf_extension
from loom.ops.quantized import BLOCK_BYTES, BLOCK_WEIGHTS, GGMLType, GGUFLinear, Int8Linear, dequantize_reference
from tests.engine.test_gguf_kquants import random_blocks

PATHS = ["auto", "avx2", "portable"]  # auto: VNNI where compiled in; avx2 / portable: forced (portable where no AVX2)


def blocks(qtype: GGMLType, rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """[rows, row bytes] of random quants: gguf's quantizer for the 32-weight formats (Q8_0 then given random int8
    bytes, -128 included, which the quantizer never writes), random blocks for the K-quants and IQ4."""
    if BLOCK_WEIGHTS[qtype] == 256 or qtype == GGMLType.IQ4_NL:  # (gguf has no quantizer for IQ4_NL)
        return random_blocks(qtype, rows, k, seed)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    raw = np.ascontiguousarray(quantize(w, GGMLQuantizationType(int(qtype))))
    if qtype == GGMLType.Q8_0:
        view = raw.reshape(rows, k // 32, BLOCK_BYTES[qtype])
        view[..., 2:] = np.random.default_rng(seed + 1).integers(0, 256, view[..., 2:].shape, dtype=np.uint8)
    return torch.from_numpy(raw)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized per 32 as llama.cpp's quantize_row_q8_0 with a float32 scale: d = amax / 127, q = round(x / d)
    (x * (1 / d), ties to even); returns (q int8 [M, K], d [M, K / 32])."""
    blocks_ = x.reshape(x.shape[0], -1, 32)
    d = blocks_.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks_ * inverse).to(torch.int8).reshape(x.shape), d.reshape(x.shape[0], -1)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    q, d = quantize_reference(x)
    x_int8 = (q.double().reshape(x.shape[0], -1, 32) * d.double()[..., None]).reshape(x.shape)
    return (x_int8 @ weight.double().T + bias.double()).float()


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_repacking_loses_nothing(qtype):
    qweight = blocks(qtype, rows=45, k=512)  # 45 features: a partial tile of 16 and a partial AVX2 half of 8
    layer = GGUFLinear(qweight, qtype, 512, activations="int8")
    assert layer.qweight is None and layer.qs.shape[0] == 3
    assert torch.equal(layer.dequantize(), dequantize_reference(qweight, qtype, 512))


@pytest.mark.parametrize("path", ["auto", "portable"])
def test_activations_are_quantized_as_the_reference_does(path):
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 256)
    x[1, :32] = 0  # an all-zero block: scale 0, quants 0
    x[2, 40] = 100.0  # an outlier owns its block's scale
    q, d, sums16, scaled16 = gguf_extension().gguf_quantize_activations(x, 16, path != "auto")
    q_ref, d_ref = quantize_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    assert torch.equal(sums16, q_ref.int().reshape(5, 16, 16).sum(-1))
    torch.testing.assert_close(scaled16, d_ref.repeat_interleave(2, 1) * sums16.float(), rtol=0, atol=0)
    _, _, sums32, _ = gguf_extension().gguf_quantize_activations(x, 32, path != "auto")
    assert torch.equal(sums32, q_ref.int().reshape(5, 8, 32).sum(-1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 70])  # tails of the 8-row tile; 70: two 64-row chunks
def test_int8_product_equals_the_reference(qtype, path, rows):
    qweight = blocks(qtype, rows=45, k=512, seed=rows)
    bias = torch.randn(45)
    layer = GGUFLinear(qweight, qtype, 512, bias=bias, activations="int8")
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    weight = dequantize_reference(qweight, qtype, 512)
    expected = reference_linear(x, weight, bias)
    float_activations = (x.double() @ weight.double().T + bias.double()).float()
    scale = expected.abs().max()
    assert (float_activations - expected).abs().max() > 100 * 2e-6 * scale  # the int8 rounding shows
    y = layer.linear(x, path)
    torch.testing.assert_close(y, expected, atol=2e-6 * scale, rtol=0)
    if path == "auto":
        assert torch.equal(layer(x), y)


def test_a_layer_forward_takes_any_leading_shape_and_a_float32_layer_keeps_its_blocks():
    qweight = blocks(GGMLType.Q4_1, rows=32, k=64)
    int8 = GGUFLinear(qweight, GGMLType.Q4_1, 64)
    assert int8.activations == "int8" and int8.nbytes == 32 * 32 + 2 * 2 * 2 * 16 * 2  # nibbles + fp16 d and m
    x = torch.randn(2, 3, 64)
    assert int8(x).shape == (2, 3, 32)
    assert torch.equal(int8(x).reshape(6, 32), int8(x.reshape(6, 64)))
    float32 = GGUFLinear(qweight, GGMLType.Q4_1, 64, activations="float32")
    assert torch.equal(float32.qweight, qweight) and torch.equal(float32.dequantize(), int8.dequantize())
    with pytest.raises(ValueError, match="activations must be one of int8, float32"):
        GGUFLinear(qweight, GGMLType.Q4_1, 64, activations="int4")


def test_the_environment_chooses_the_default(monkeypatch):
    qweight = blocks(GGMLType.Q8_0, rows=16, k=64)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    assert GGUFLinear(qweight, GGMLType.Q8_0, 64).activations == "float32"
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="LOOM_GGUF_ACTIVATIONS must be one of int8, float32, got 'fp8'"):
        GGUFLinear(qweight, GGMLType.Q8_0, 64)


def test_a_packed_weight_that_does_not_fit_is_refused():
    layer = GGUFLinear(blocks(GGMLType.Q4_0, rows=16, k=64), GGMLType.Q4_0, 64)
    with pytest.raises(RuntimeError, match="does not fit x"):
        gguf_extension().gguf_int8_linear(torch.randn(2, 96), layer.qs, layer.scales, layer.mins, int(layer.qtype), 16)
    with pytest.raises(RuntimeError, match="path: auto, avx2 or portable"):
        layer.linear(torch.randn(2, 64), "neon")


# Weight-only int8 for HF folders (--quantization int8): one float32 scale per output feature, the same kernels.


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 9, 70])
def test_int8_rows_layer_equals_the_reference(path, rows):
    weight = torch.randn(45, 256, generator=torch.Generator().manual_seed(rows)) * torch.linspace(0.1, 3, 45)[:, None]
    bias = torch.randn(45)
    layer = Int8Linear(weight, bias)
    scale = weight.abs().amax(1, keepdim=True) / 127
    q = torch.round(weight / scale)
    assert q.abs().max() == 127
    dequantized = layer.dequantize()
    torch.testing.assert_close(dequantized, q * scale, rtol=1e-6, atol=0)  # scale[n] q[n, k]
    assert ((dequantized - weight).abs() <= scale / 2 * (1 + 1e-5)).all()  # each weight rounded to its nearest step
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(100 + rows))
    expected = reference_linear(x, dequantized, bias)
    torch.testing.assert_close(layer.linear(x, path), expected, atol=2e-6 * expected.abs().max(), rtol=0)


def test_int8_rows_refuse_widths_off_the_32_grid():
    with pytest.raises(ValueError, match="in_features a multiple of 32, got 40"):
        Int8Linear(torch.randn(4, 40))


@pytest.mark.slow
def test_an_hf_folder_served_with_int8_weights_agrees_with_float32(smollm2_path):
    from loom import LLM, SamplingParams
    from tests.engine.test_parity import teacher_forced_agreement, varied_prompts

    int8 = LLM(str(smollm2_path), quantization="int8", num_kv_blocks=512)
    model = int8.engine.model
    assert isinstance(model.layers[3].mlp.down_proj, Int8Linear) and isinstance(model.logits_proj, Int8Linear)
    assert isinstance(model.layers[3].self_attn.qkv_proj, Int8Linear)
    prompts = varied_prompts(24, seed=12, low=4, high=40)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = LLM(str(smollm2_path), num_kv_blocks=512).generate([{"prompt_token_ids": p} for p in prompts], params)
    assert teacher_forced_agreement(int8, prompts, [o.outputs[0].token_ids for o in full]) >= 0.9


def test_int8_quantization_is_refused_where_it_does_not_run(tmp_path):
    from loom.engine.config import EngineConfig
    from loom.engine.model_runner import build_model

    with pytest.raises(ValueError, match="quantization must be int8"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="already quantized"):
        build_model(tmp_path / "m.gguf", EngineConfig(quantization="int8"), torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="runs on CPU in float32"):
        build_model(tmp_path, EngineConfig(quantization="int8", dtype="bfloat16"), torch.device("cpu"), 64)
