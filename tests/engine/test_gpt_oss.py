"""gpt-oss (``GptOssForCausalLM``) beyond what the MoE parity tests check (tests/engine/test_moe.py: greedy ids and
logprobs against transformers through chunks and a prefix hit, routing token by token; tests/ops: the sinks in every
backend's kernels): the reference's sink attention against transformers' own, checkpoints whose experts are MXFP4
(expanded at load as transformers dequantizes them), and quantization methods Loom does not read refused."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM
from loom.models.mxfp4 import dequantize_mxfp4, mxfp4_as_q8_0, quantize_mxfp4
from loom.models.tiny import save_mxfp4_copy
from loom.ops.attention import PrefillChunk, prefill_attention
from tests.conftest import save_tiny_model
from tests.engine.test_parity import assert_parity, hf_greedy, loom_greedy, varied_prompts


@pytest.mark.parametrize("window", [None, 5])
def test_sink_attention_equals_transformers_eager_attention(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    n, heads, kv_heads, d = 12, 6, 2, 8
    q, k, v = torch.randn(n, heads, d) * 2, torch.randn(n, kv_heads, d) * 2, torch.randn(n, kv_heads, d)
    sinks = torch.randn(heads) * 2 + 2
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, sinks=sinks, training=False)
    theirs, _ = eager_attention_forward(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        v.transpose(0, 1)[None], mask, scaling=0.3)
    chunk = PrefillChunk(0, n, 0, None)  # the chunk's own keys are given: the cache is read for its shape only
    ours = prefill_attention(q, k, v, k[None], v[None], chunk, 0.3, window, sinks=sinks)
    torch.testing.assert_close(ours, theirs[0], atol=1e-6, rtol=1e-6)
    sinkless = prefill_attention(q, k, v, k[None], v[None], chunk, 0.3, window)
    assert (ours - sinkless).abs().max() > 0.1


def test_mxfp4_dequantization_equals_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (3, 10, 4), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]: transposed
    assert torch.equal(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2))
    round_trip = quantize_mxfp4(theirs.transpose(1, 2))
    assert torch.equal(dequantize_mxfp4(*round_trip), theirs.transpose(1, 2))  # grid values come back exactly


def test_mxfp4_blocks_are_q8_0_blocks_without_loss():
    """Kept quantized, an MXFP4 weight is GGUF Q8_0 rows (twice the FP4 values, half the power-of-two scale): the gguf
    package's own Q8_0 dequantizer gives back transformers' MXFP4 expansion exactly; a scale float16 cannot hold
    gets None (the loader expands that weight instead)."""
    from loom.ops.quantized import GGMLType, dequantize_reference

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(104, 144, (2, 6, 3), dtype=torch.uint8, generator=g)  # float16's whole range of powers
    rows = mxfp4_as_q8_0(blocks, scales)
    assert rows.shape == (2, 6, 3 * 34)
    for e in range(2):
        assert torch.equal(dequantize_reference(rows[e], GGMLType.Q8_0, 96), dequantize_mxfp4(blocks, scales)[e])
    assert mxfp4_as_q8_0(blocks, scales.clone().fill_(103)) is None
    assert mxfp4_as_q8_0(blocks, scales.clone().fill_(144)) is None


def test_an_mxfp4_checkpoint_serves_as_transformers_runs_it_dequantized(tmp_path, smollm2_path, monkeypatch):
    from transformers import Mxfp4Config

    from loom.models import loader

    path = save_mxfp4_copy(save_tiny_model(tmp_path / "float", smollm2_path, arch="gpt_oss"), tmp_path / "mxfp4")
    prompts = varied_prompts(4, seed=7, low=10, high=40)
    reference = hf_greedy(path, prompts, 8, quantization_config=Mxfp4Config(dequantize=True))
    replaced = []  # what each kept expert replaces: a placeholder with no float weight (never given memory)
    make = loader._q8_0_linear
    monkeypatch.setattr(loader, "_q8_0_linear", lambda old, *a: (replaced.append(old), make(old, *a))[1])
    llm = LLM(str(path), num_kv_blocks=64, block_size=8, max_num_batched_tokens=32)
    assert len(replaced) == 2 * 2 * 8 and not any(hasattr(old, "weight") for old in replaced)
    experts = [m for layer in llm.engine.model.layers for e in layer.mlp.experts for m in (e.gate_up_proj, e.down_proj)]
    assert {type(m).__name__ for m in experts} == {"GGUFLinear"}  # kept quantized: 34 bytes per 32 weights
    assert sum(m.nbytes for m in experts) == sum(m.in_features * m.out_features for m in experts) * 34 // 32
    ours = loom_greedy(llm, prompts, 8)
    assert_parity(ours, reference)
    # bfloat16 on CPU has no quantized kernel: the experts are expanded, to the same weights
    expanded = LLM(str(path), num_kv_blocks=64, block_size=8, dtype="bfloat16").engine.model.layers[0].mlp.experts[0]
    assert type(expanded.gate_up_proj) is torch.nn.Linear
    torch.testing.assert_close(expanded.gate_up_proj.weight.float(), experts[0].dequantize(), atol=0, rtol=0)
    # the expansion is not the float weights: quantizing moved them enough to change the model's logprobs
    floats = loom_greedy(LLM(str(tmp_path / "float"), num_kv_blocks=64, block_size=8), prompts, 8)
    assert max(abs(a - b) for (_, x), (_, y) in zip(ours, floats) for a, b in zip(x, y)) > 1e-3


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "eetq"])
def test_a_checkpoint_quantized_by_a_method_loom_does_not_read_is_refused(tmp_path, tiny_llama, method):
    path = shutil.copytree(tiny_llama, tmp_path / method)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"quantized with '{method}', which Loom does not load"):
        LLM(str(path), num_kv_blocks=16)


def test_mxfp4_experts_through_triton_kernels_give_the_cpu_kernels_tokens(tmp_path, smollm2_path):
    """On CUDA the kept experts run through Triton's dequant-matmul (here under its interpreter)."""
    path = save_mxfp4_copy(save_tiny_model(tmp_path / "float", smollm2_path, arch="gpt_oss"), tmp_path / "mxfp4")
    prompts = varied_prompts(2, seed=8, low=10, high=30)
    engine = dict(num_kv_blocks=64, block_size=8, dtype="float32")
    triton_llm = LLM(str(path), attention_backend="triton", **engine)
    assert type(triton_llm.engine.model.layers[0].mlp.experts[0].down_proj).__name__ == "TritonQuantLinear"
    ours = loom_greedy(triton_llm, prompts, 4)
    reference = loom_greedy(LLM(str(path), **engine), prompts, 4)
    assert [o[0] for o in ours] == [r[0] for r in reference]
    assert max(abs(a - b) for (_, x), (_, y) in zip(ours, reference) for a, b in zip(x, y)) < 1e-4


def test_float_weights_replace_kept_mxfp4_experts(tmp_path, smollm2_path):
    """GRPO's weight syncs (``update_weights``) on an MXFP4 checkpoint: the kept experts are expanded to take the
    float weights, and the engine then gives the float model's outputs."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch="gpt_oss")
    llm = LLM(str(save_mxfp4_copy(folder, tmp_path / "mxfp4")), num_kv_blocks=64, block_size=8)
    float_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    llm.update_weights(float_model.state_dict().items())
    assert type(llm.engine.model.layers[0].mlp.experts[0].gate_up_proj) is torch.nn.Linear
    prompts = varied_prompts(3, seed=4, low=10, high=30)
    assert_parity(loom_greedy(llm, prompts, 6), hf_greedy(folder, prompts, 6))


def test_mxfp4_scales_float16_cannot_hold_give_float_experts(tmp_path, smollm2_path):
    path = save_mxfp4_copy(save_tiny_model(tmp_path / "float", smollm2_path, arch="gpt_oss"), tmp_path / "mxfp4")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 0, 0] = 100  # 2 ** -28: below float16's smallest
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(path), num_kv_blocks=64, block_size=8)
    layers = llm.engine.model.layers
    assert type(layers[1].mlp.experts[0].down_proj).__name__ == "PackedLinear"  # that layer's down_proj: floats
    assert type(layers[1].mlp.experts[0].gate_up_proj).__name__ == "GGUFLinear"  # the others kept
    prompts = varied_prompts(3, seed=5, low=10, high=30)
    from transformers import Mxfp4Config

    assert_parity(loom_greedy(llm, prompts, 6), hf_greedy(path, prompts, 6,
                                                           quantization_config=Mxfp4Config(dequantize=True)))
