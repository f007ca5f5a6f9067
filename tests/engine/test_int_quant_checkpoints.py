"""GPTQ and AWQ checkpoints (``loom.models.int_quant``), kept quantized as GGUF blocks.

The checkpoints are written here the way AutoGPTQ's and AutoAWQ's ``pack`` write them (word by word, field by field:
a different procedure from Loom's vectorised unpacking), from integers drawn here; the reference is the model with
the weights those integers stand for, scale * (q - zero), computed here in float32 and run by HF transformers (or by
Loom's float path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM
from loom.models.int_quant import (
    AWQ_ORDER,
    GatheredInputs,
    IntQuantConfig,
    IntWeights,
    as_blocks,
    block_quants,
    gguf_rows,
    read_awq,
    read_compressed_tensors,
    read_gptq,
)
from loom.ops.quantized import GGMLType, GGUFLinear, StackedGGUFLinear, dequantize_block_quants, dequantize_reference
from tests.conftest import save_tiny_model
from tests.engine.test_fp8_checkpoints import per_expert, write_quantized
from tests.engine.test_parity import assert_parity, hf_greedy, loom_greedy, teacher_forced_agreement, varied_prompts

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINE = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=32)  # chunked prefills


def quantize(weight: torch.Tensor, bits: int, group: int, sym: bool, order: torch.Tensor | None = None):
    """Round-to-nearest integers for ``weight`` [out, in] (the integers are what the test is about, not their
    quality): q [out, in], zero and scale [out, groups], g_idx [in]. ``order``: act-order, groups taken over the
    inputs in that order (GPTQ's ``desc_act``)."""
    out_features, in_features = weight.shape
    top = (1 << bits) - 1
    g_idx = torch.arange(in_features) // group if order is None else torch.empty(in_features, dtype=torch.long)
    if order is not None:
        g_idx[order] = torch.arange(in_features) // group
    groups = int(g_idx.max()) + 1
    q = torch.empty(out_features, in_features, dtype=torch.long)
    zero = torch.empty(out_features, groups, dtype=torch.long)
    scale = torch.empty(out_features, groups, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero()[:, 0]
        w = weight[:, cols].float()
        if sym:
            s = (w.abs().amax(1) * 2 / top).clamp(min=1e-6)
            z = torch.full((out_features,), (top + 1) // 2)
        else:
            lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            s = ((hi - lo) / top).clamp(min=1e-6)
            z = torch.round(-lo / s).clamp(0, top).long()
        s16 = s.to(torch.float16)
        q[:, cols] = (torch.round(w / s16.float()[:, None]) + z[:, None]).clamp(0, top).long()
        zero[:, g], scale[:, g] = z, s16
    return q, zero, scale, g_idx


def expand(q, zero, scale, g_idx) -> torch.Tensor:
    """The weights the integers stand for, one element at a time over the groups."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for k in range(q.shape[1]):
        g = int(g_idx[k])
        out[:, k] = scale[:, g].float() * (q[:, k] - zero[:, g]).float()
    return out


def _word(values, shifts) -> int:
    word = 0
    for value, shift in zip(values, shifts):
        word |= int(value) << shift
    return word - (1 << 32) if word >= 1 << 31 else word  # as int32


def pack_gptq(q, zero, scale, g_idx, bits: int, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: qweight [in / pack, out] packed along the inputs, qzeros [groups, out / pack] along the
    outputs (the v1 format stores each zero minus one, here masked to its field: a zero of 0 is stored as all ones in
    its field only), scales [groups, out], g_idx."""
    per = 32 // bits
    mask = (1 << bits) - 1
    shifts = [bits * i for i in range(per)]
    qt = q.t()  # [in, out]
    qweight = [[_word(qt[r * per:(r + 1) * per, n], shifts) for n in range(qt.shape[1])]
               for r in range(qt.shape[0] // per)]
    stored = ((zero - 1) & mask if v1 else zero).t()  # [groups, out]
    qzeros = [[_word(stored[g, c * per:(c + 1) * per], shifts) for c in range(stored.shape[1] // per)]
              for g in range(stored.shape[0])]
    return {"qweight": torch.tensor(qweight, dtype=torch.int32), "qzeros": torch.tensor(qzeros, dtype=torch.int32),
            "scales": scale.t().contiguous(), "g_idx": g_idx.to(torch.int32)}


def pack_awq(q, zero, scale) -> dict[str, torch.Tensor]:
    """AutoAWQ's "gemm" layout: qweight [in, out / 8] and qzeros [groups, out / 8], output column c * 8 +
    AWQ_ORDER[i] in nibble i of word c."""
    shifts = [4 * i for i in range(8)]
    qt, zt = q.t(), zero.t()

    def packed(m):
        return [[_word([m[r, c * 8 + AWQ_ORDER[i]] for i in range(8)], shifts) for c in range(m.shape[1] // 8)]
                for r in range(m.shape[0])]
    return {"qweight": torch.tensor(packed(qt), dtype=torch.int32),
            "qzeros": torch.tensor(packed(zt), dtype=torch.int32), "scales": scale.t().contiguous()}


def pack_compressed_tensors(q, zero, scale, g_idx, bits: int, sym: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors' "pack-quantized" layout: weight_packed [out, in / pack] packed along the inputs (each value
    the signed quant plus 2^(bits - 1): the unsigned quant), weight_zero_point [out / pack, groups] packed along the
    outputs (asymmetric only), weight_scale [out, groups], weight_g_idx, weight_shape."""
    per = 32 // bits
    shifts = [bits * i for i in range(per)]
    packed = [[_word(q[n, c * per:(c + 1) * per], shifts) for c in range(q.shape[1] // per)] for n in range(q.shape[0])]
    tensors = {"weight_packed": torch.tensor(packed, dtype=torch.int32), "weight_scale": scale.contiguous(),
               "weight_shape": torch.tensor(list(q.shape)), "weight_g_idx": g_idx.to(torch.int32)}
    if not sym:
        tensors["weight_zero_point"] = torch.tensor(
            [[_word(zero[r * per:(r + 1) * per, g], shifts) for g in range(zero.shape[1])]
             for r in range(zero.shape[0] // per)], dtype=torch.int32)
    return tensors


def compressed_tensors(bits: int = 4, group: int = 32, sym: bool = True, actorder: str | None = None) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                                                "weights": {
        "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group > 0 else "channel",
        "group_size": group if group > 0 else None, "actorder": actorder, "dynamic": False}}}}  # fmt: skip


def scheme(quantization: dict) -> tuple[int, int, bool, bool]:
    """(bits, group size, symmetric, act-order) of a GPTQ, AWQ or compressed-tensors config."""
    if quantization["quant_method"] == "compressed-tensors":
        weights = quantization["config_groups"]["group_0"]["weights"]
        return (weights["num_bits"], weights["group_size"] or -1, weights["symmetric"],
                weights["actorder"] is not None)
    sym = quantization.get("sym", not quantization.get("zero_point", True))
    return quantization["bits"], quantization["group_size"], sym, bool(quantization.get("desc_act"))


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


def as_quantized(folder: Path, target: Path, quantization: dict, shared_order: bool = True, seed: int = 0,
                 head: bool = False, modules: tuple[str, ...] = PROJECTIONS, zero_biases: bool = False):
    """``folder``'s checkpoint with every projection quantized as ``quantization`` says, written to ``target``; and
    beside it ``target``-float, the same model with the weights the integers stand for (the reference). Act-order
    (``desc_act``) draws one input order per layer and input (``shared_order``, as GPTQ's Hessian gives q, k and v
    one) or one per projection. ``head``: the LM head too (GPTQModel's ``lm_head: true``); ``modules``: the name
    endings quantized; ``zero_biases``: a zero float16 bias beside each (as AutoGPTQ saved them before 2024)."""
    shutil.copytree(folder, target)
    reference = Path(shutil.copytree(folder, f"{target}-float"))
    generator = torch.Generator().manual_seed(seed)
    bits, group, sym, act_order = scheme(quantization)
    method = quantization["quant_method"]
    orders: dict[tuple[str, int], torch.Tensor] = {}
    packed, floats = {}, {}
    for name, tensor in load_file(target / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and (module.endswith(modules) or head and module == "lm_head")
                and ".mlp.gate." not in name):
            packed[name] = floats[name] = tensor
            continue
        order = None
        if act_order:
            key = (module.rsplit(".", 1)[0] if shared_order else module, tensor.shape[1])
            order = orders.setdefault(key, torch.randperm(tensor.shape[1], generator=generator))
        q, zero, scale, g_idx = quantize(tensor, bits, group if group > 0 else tensor.shape[1], sym, order)
        if method == "compressed-tensors":  # its scales in the model's dtype: bfloat16 here
            scale = scale.to(torch.bfloat16)
            tensors = pack_compressed_tensors(q, zero, scale, g_idx, bits, sym)
        elif method == "awq":
            tensors = pack_awq(q, zero, scale)
        else:
            tensors = pack_gptq(q, zero, scale, g_idx, bits, quantization.get("checkpoint_format") != "gptq_v2")
        floats[name] = expand(q, zero, scale, g_idx)
        packed.update({f"{module}.{key}": value for key, value in tensors.items()})
        if zero_biases and f"{module}.bias" not in packed:
            packed[f"{module}.bias"] = torch.zeros(tensor.shape[0], dtype=torch.float16)
    return write_quantized(target, reference, packed, floats, quantization)


@pytest.mark.parametrize("bits, sym, v1", [(4, True, True), (4, False, True), (4, False, False), (8, True, True)])
def test_gptq_tensors_read_back_as_the_integers_autogptq_packed(bits, sym, v1):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(24, 64, generator=generator)
    order = torch.randperm(64, generator=generator)
    q, zero, scale, g_idx = quantize(weight, bits, 32, sym, order)
    if not sym:
        zero[0, 0] = 0  # v1 stores it as -1: it reads back as 2^bits, as AutoGPTQ's kernels read it
    tensors = pack_gptq(q, zero, scale, g_idx, bits, v1)
    w = read_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                  IntQuantConfig("gptq", bits, 32, 1 if v1 else 0))
    expected_zero = zero.clone()
    if v1 and not sym:
        expected_zero[0, 0] = 1 << bits
    assert torch.equal(w.q.long(), q) and torch.equal(w.zero.long(), expected_zero)
    assert torch.equal(w.scale, scale) and torch.equal(w.group, g_idx)


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, False)])
def test_compressed_tensors_read_back_as_the_integers_packed(bits, sym):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(24, 64, generator=generator)
    q, zero, scale, g_idx = quantize(weight, bits, 32, sym, torch.randperm(64, generator=generator))
    scale = scale.to(torch.bfloat16)
    tensors = pack_compressed_tensors(q, zero, scale, g_idx, bits, sym)
    w = read_compressed_tensors(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                                tensors["weight_g_idx"], tensors["weight_shape"],
                                IntQuantConfig("compressed-tensors", bits, 32, 0))
    assert torch.equal(w.q.long(), q) and torch.equal(w.zero.long(), zero) and torch.equal(w.group, g_idx)
    assert torch.equal(w.dequantize(), expand(q, zero, scale, g_idx))
    unordered = read_compressed_tensors(tensors["weight_packed"], tensors["weight_scale"],
                                        tensors.get("weight_zero_point"), torch.full((64,), -1), None,
                                        IntQuantConfig("compressed-tensors", bits, 32, 0))
    assert torch.equal(unordered.group, torch.arange(64) // 32)  # g_idx of -1s: column order


def test_awq_tensors_read_back_as_the_integers_autoawq_packed():
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    q, zero, scale, _ = quantize(weight, 4, 32, sym=False)
    tensors = pack_awq(q, zero, scale)
    w = read_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], IntQuantConfig("awq", 4, 32, 0))
    assert torch.equal(w.q.long(), q) and torch.equal(w.zero.long(), zero) and torch.equal(w.scale, scale)
    assert torch.equal(w.dequantize(), expand(q, zero, scale, torch.arange(64) // 32))


def integer_weights(bits: int, sym: bool, act_order: bool, group: int = 64, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(20, 128, generator=generator)
    order = torch.randperm(128, generator=generator) if act_order else None
    q, zero, scale, g_idx = quantize(weight, bits, group, sym, order)
    return IntWeights(q.to(torch.int16), zero.to(torch.int16), scale, g_idx, bits), expand(q, zero, scale, g_idx)


CASES = [(4, True, False), (4, True, True), (4, False, False), (4, False, True), (8, True, True), (8, False, False)]


@pytest.mark.parametrize("bits, sym, act_order", CASES)
def test_blocks_hold_exactly_the_integers_weights_over_the_inputs_in_their_order(bits, sym, act_order):
    w, expected = integer_weights(bits, sym, act_order)
    blocks = as_blocks(w)
    assert (blocks.order is not None) == act_order
    bq = block_quants([blocks])
    assert (bq.offset is None) == sym  # symmetric: Q4_0's / Q8_0's arithmetic; else a min per block
    gathered = torch.arange(128) if blocks.order is None else blocks.order
    assert torch.equal(dequantize_block_quants(bq), expected[:, gathered])


@pytest.mark.parametrize("bits, sym, act_order", CASES)
def test_the_int8_kernels_tiles_hold_the_blocks_exactly(bits, sym, act_order):
    """Q4_0 / Q8_0 tiles where symmetric, Q4_K's / Q5_K's float32 scale-and-min tiles otherwise; the product with
    int8 activations stays within their rounding of x @ W^T."""
    w, expected = integer_weights(bits, sym, act_order)
    blocks = as_blocks(w)
    bq = block_quants([blocks])
    layer = GGUFLinear.from_quants(bq, 128)
    assert layer.qtype == ({4: GGMLType.Q4_0, 8: GGMLType.Q8_0} if sym else {4: GGMLType.Q4_K, 8: GGMLType.Q5_K})[bits]
    assert torch.equal(layer.dequantize(), dequantize_block_quants(bq))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    gathered = torch.arange(128) if blocks.order is None else blocks.order
    reference = x[:, gathered] @ expected[:, gathered].t()
    assert (layer(x[:, gathered]) - reference).abs().max() < 0.02 * reference.abs().max()


@pytest.mark.parametrize("bits, sym, act_order, qtype", [
    (4, True, False, GGMLType.Q4_0), (4, False, True, GGMLType.Q4_1), (8, True, True, GGMLType.Q8_0),
])  # fmt: skip
def test_blocks_as_gguf_rows_read_back_by_the_gguf_package(bits, sym, act_order, qtype):
    """The float32-activation kernels' input: exact for Q4_0 and Q8_0, Q4_1's min rounded to float16."""
    w, expected = integer_weights(bits, sym, act_order)
    blocks = as_blocks(w)
    encoded_type, rows = gguf_rows(block_quants([blocks]))
    assert encoded_type == qtype
    gathered = torch.arange(128) if blocks.order is None else blocks.order
    got, want = dequantize_reference(torch.from_numpy(rows), qtype, 128), expected[:, gathered]
    if qtype == GGMLType.Q4_1:  # |m - fp16(m)| <= |m| 2^-11, m = -d zero
        assert 0 < (got - want).abs().max() <= (w.scale.float() * w.zero).abs().max() * 2**-11
    else:
        assert torch.equal(got, want)


def test_groups_that_do_not_fill_whole_blocks_are_left_to_float_weights():
    w, _ = integer_weights(4, True, False, group=32)
    mixed = torch.tensor([0, 1] * 32 + [2, 3] * 32)  # act-order groups of 32 that sort into whole blocks
    assert as_blocks(IntWeights(w.q, w.zero, w.scale, mixed, 4)) is not None
    uneven = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32)  # groups of 40 and 24
    assert as_blocks(IntWeights(w.q, w.zero, w.scale, uneven, 4)) is None
    assert gguf_rows(block_quants([as_blocks(integer_weights(8, False, False)[0])])) is None  # 8-bit with mins


def test_a_gptq_checkpoint_runs_quantized_as_transformers_runs_its_weights(tmp_path, smollm2_path, monkeypatch):
    """Symmetric 4-bit GPTQ is Q4_0 exactly: with float32 activations Loom's kernels give transformers' logprobs on
    the expanded weights to float rounding, through chunked prefills and a prefix hit."""
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch="qwen2")  # q/k/v biases beside the integers
    path, reference = as_quantized(folder, tmp_path / "gptq", GPTQ)
    llm = LLM(str(path), **ENGINE)
    model = llm.engine.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, GGUFLinear)
    assert model.layers[0].mlp.down_proj.qtype == GGMLType.Q4_0
    prompts = varied_prompts(4, seed=5, low=10, high=40)
    prompts.append(prompts[0][:24] + [300, 301])  # a prefix hit on the first prompt's blocks
    assert_parity(loom_greedy(llm, prompts, 8), hf_greedy(reference, prompts, 8))


def assert_holds_the_weights(model, reference: Path) -> None:
    """Every projection of the loaded model holds exactly the weights the integers stand for (fused parts stacked,
    act-order's inputs put back in their own order)."""
    weights = load_file(reference / "model.safetensors")
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for module, names in ((layer.self_attn.qkv_proj, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                              (layer.self_attn.o_proj, ["self_attn.o_proj"]),
                              (layer.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"]),
                              (layer.mlp.down_proj, ["mlp.down_proj"])):
            expected = torch.cat([weights[f"{prefix}{name}.weight"] for name in names])
            assert torch.equal(module.dequantize(), expected), f"layer {i}: {names}"


@pytest.mark.parametrize("quantization, arch", [
    (AWQ, "llama"),
    ({**GPTQ, "sym": False, "desc_act": True}, "qwen3"),  # act-order; q / k / v sharing one order
    ({**GPTQ, "desc_act": True, "bits": 8, "checkpoint_format": "gptq_v2"}, "llama"),
    ({**GPTQ, "group_size": -1}, "mistral"),
    (compressed_tensors(), "qwen2"),  # RedHatAI's w4a16: symmetric groups of 128 (32 here), bfloat16 scales
    (compressed_tensors(sym=False, actorder="group"), "llama"),
    (compressed_tensors(bits=8, group=-1), "qwen3"),  # w8a16: one group per output channel
])  # fmt: skip
def test_integer_checkpoint_variants_hold_their_weights_exactly(tmp_path, smollm2_path, quantization, arch):
    """On the default int8-activation kernels (llama.cpp's arithmetic): the weights exactly, and the expanded
    weights' greedy tokens."""
    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch=arch)
    path, reference = as_quantized(folder, tmp_path / "quantized", quantization)
    llm = LLM(str(path), **ENGINE)
    qkv = llm.engine.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, GatheredInputs if scheme(quantization)[3] else GGUFLinear)
    assert_holds_the_weights(llm.engine.model, reference)
    prompts = varied_prompts(24, seed=6, low=5, high=30)
    expected = [ids for ids, _ in loom_greedy(LLM(str(reference), **ENGINE), prompts, 8)]
    # int8 activations alone cost this random tiny model 5-10% of its near-tied tokens (0.90-0.95 measured); a
    # misplaced nibble or group costs nearly all of them
    assert teacher_forced_agreement(llm, prompts, expected) >= 0.85


def test_a_quantized_lm_head_and_quantized_experts(tmp_path, smollm2_path, monkeypatch):
    """Qwen2-MoE's routed and shared experts, each expert's projections in the checkpoint, and the LM head
    (GPTQModel quantizes it on request): all quantized, the router and the shared expert's gate float."""
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = per_expert(save_tiny_model(tmp_path / "float", smollm2_path, arch="qwen2_moe", tie_word_embeddings=False))
    path, reference = as_quantized(folder, tmp_path / "gptq", {**GPTQ, "lm_head": True}, head=True)
    llm = LLM(str(path), **ENGINE)
    model, weights = llm.engine.model, load_file(reference / "model.safetensors")
    assert model.lm_head is None and torch.equal(model.logits_proj.dequantize(), weights["lm_head.weight"])
    moe = model.layers[0].mlp
    for e, expert in enumerate(moe.experts):
        gate_up = torch.cat([weights[f"model.layers.0.mlp.experts.{e}.{x}_proj.weight"] for x in ("gate", "up")])
        assert isinstance(expert.gate_up_proj, GGUFLinear) and torch.equal(expert.gate_up_proj.dequantize(), gate_up)
    assert isinstance(moe.shared_expert.down_proj, GGUFLinear) and not hasattr(moe.gate, "qtype")
    prompts = varied_prompts(3, seed=10, low=10, high=40)
    assert_parity(loom_greedy(llm, prompts, 8), loom_greedy(LLM(str(reference), **ENGINE), prompts, 8), atol=1e-4)


@pytest.mark.parametrize("arch, overrides, dtype", [
    ("glm4_moe", {}, "float32"),  # half-rotary heads and q/k/v biases, quantized: rows and bias reordered once
    ("phi3", {"partial_rotary_factor": 0.5, "pad_token_id": 0}, "bfloat16"),  # fused qkv, expanded: ordered once
])  # fmt: skip
def test_partial_rotary_rows_and_biases_are_ordered_once(tmp_path, smollm2_path, monkeypatch, arch, overrides, dtype):
    """Partial rotary loads q/k rows (and their biases) in another order; a quantized projection gets it as it is
    placed, floats expanded from integers by the pass every float weight gets, never both."""
    from loom.models.loader import load_model

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch=arch, **overrides)
    if arch == "glm4_moe":
        per_expert(folder)
    path, reference = as_quantized(folder, tmp_path / "gptq", GPTQ)
    torch_dtype = getattr(torch, dtype)
    ours = load_model(path, torch_dtype, torch.device("cpu"), 64).layers[0].self_attn.qkv_proj
    theirs = load_model(reference, torch_dtype, torch.device("cpu"), 64).layers[0].self_attn.qkv_proj
    assert isinstance(ours, GGUFLinear if dtype == "float32" else torch.nn.Linear)
    assert torch.equal(ours.weight if dtype == "bfloat16" else ours.dequantize(), theirs.weight.to(
        ours.weight.dtype if dtype == "bfloat16" else torch.float32))
    if theirs.bias is not None:
        assert torch.equal(ours.bias.float(), theirs.bias.float())
    prompts = varied_prompts(3, seed=11, low=10, high=30)
    engine = dict(ENGINE, dtype=dtype)
    assert_parity(loom_greedy(LLM(str(path), **engine), prompts, 6),
                  loom_greedy(LLM(str(reference), **engine), prompts, 6), atol=1e-4 if dtype == "float32" else 0.05)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_projections_quantized(tmp_path, smollm2_path, monkeypatch, arch):
    """GPTQModel quantizes every MLA projection: kv_b_proj (held by Loom as its absorbed latent projection) is
    expanded to floats, the others stay quantized, the rotary rows de-interleaved alike."""
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = per_expert(save_tiny_model(tmp_path / "float", smollm2_path, arch=arch))
    path, reference = as_quantized(folder, tmp_path / "gptq", GPTQ, modules=("_proj", "_mqa"))
    llm = LLM(str(path), **ENGINE)
    attn = llm.engine.model.layers[0].self_attn
    assert isinstance(attn.kv_a_proj_with_mqa, GGUFLinear)  # o_proj's 80 inputs are no whole 32-blocks: floats
    prompts = varied_prompts(3, seed=12, low=10, high=30)
    assert_parity(loom_greedy(llm, prompts, 6), loom_greedy(LLM(str(reference), **ENGINE), prompts, 6), atol=1e-4)


def test_zero_biases_older_autogptq_saved_and_negative_dynamic_rules_load(tmp_path, smollm2_path, monkeypatch):
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    quantization = {**GPTQ, "dynamic": {"-:.*lm_head.*": {}}}  # GPTQModel: leave these unquantized
    path, reference = as_quantized(folder, tmp_path / "gptq", quantization, zero_biases=True)
    assert "model.layers.0.mlp.down_proj.bias" in load_file(path / "model.safetensors")
    prompts = varied_prompts(3, seed=13, low=10, high=30)
    assert_parity(loom_greedy(LLM(str(path), **ENGINE), prompts, 6),
                  loom_greedy(LLM(str(reference), **ENGINE), prompts, 6), atol=1e-4)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.bias"][0] = 1.0  # a real bias where Llama has none: refused
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.bias .* has no place"):
        LLM(str(path), **ENGINE)


def test_act_order_with_an_order_per_projection_gathers_each_part_its_own_way(tmp_path, smollm2_path, monkeypatch):
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, reference = as_quantized(folder, tmp_path / "gptq", {**GPTQ, "desc_act": True}, shared_order=False)
    llm = LLM(str(path), **ENGINE)
    qkv = llm.engine.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, StackedGGUFLinear) and len(qkv.parts) == 3
    assert all(isinstance(part, GatheredInputs) for part in qkv.parts)
    prompts = varied_prompts(3, seed=7, low=10, high=40)
    assert_parity(loom_greedy(llm, prompts, 8), hf_greedy(reference, prompts, 8))


def test_awq_through_triton_kernels_runs_exactly_its_weights(tmp_path, smollm2_path):
    """Triton's dequant-matmul over the blocks with float32 mins (under the interpreter here): the expanded weights'
    logprobs on the same attention backend."""
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, reference = as_quantized(folder, tmp_path / "awq", AWQ)
    prompts = varied_prompts(2, seed=9, low=10, high=30)
    engine = dict(ENGINE, attention_backend="triton")
    llm = LLM(str(path), **engine)
    assert type(llm.engine.model.layers[0].mlp.gate_up_proj).__name__ == "TritonQuantLinear"
    assert_parity(loom_greedy(llm, prompts, 4), loom_greedy(LLM(str(reference), **engine), prompts, 4), atol=1e-4)


def test_a_quantized_checkpoint_in_bfloat16_on_cpu_loads_as_its_weights_in_floats(tmp_path, smollm2_path):
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, reference = as_quantized(folder, tmp_path / "gptq", GPTQ)
    llm = LLM(str(path), dtype="bfloat16", **ENGINE)
    qkv = llm.engine.model.layers[0].self_attn.qkv_proj
    expected = torch.cat([load_file(reference / "model.safetensors")[f"model.layers.0.self_attn.{x}_proj.weight"]
                          for x in "qkv"])
    assert qkv.weight.dtype == torch.bfloat16
    assert torch.equal(qkv.weight.float(), expected.to(torch.bfloat16).float())


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [False, True])
def test_a_gptq_checkpoint_splits_over_two_ranks_and_runs_as_on_one(tmp_path, smollm2_path, monkeypatch, act_order):
    """Each rank's rows, and its input columns in whole blocks; with act-order a rank's columns hold parts of every
    group, which 32-blocks cannot hold: its row-parallel projections load as floats."""
    from tests.engine.test_tensor_parallel import _assert_same_run

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    folder = save_tiny_model(tmp_path / "float", smollm2_path, num_key_value_heads=2)
    path, _ = as_quantized(folder, tmp_path / "gptq", {**GPTQ, "desc_act": act_order})
    shared = list(range(100, 140))
    _assert_same_run(path, [[shared + [7, 8], list(range(300, 323))], [shared + [9]]], max_num_batched_tokens=16)


@pytest.mark.parametrize("change, match", [
    ({"version": "gemv"}, "'gemv' layout"),
    ({"bits": 3}, "3-bit GPTQ"),
    ({"group_size": 16}, "groups of 16"),
    ({"checkpoint_format": "marlin"}, "'marlin' format"),
    ({"dynamic": {"+:.*down_proj.*": {"bits": 8}}}, "per-module overrides"),
    ({"pack_dtype": "int16"}, "int16 words"),
])  # fmt: skip
def test_integer_checkpoints_loom_cannot_read_are_refused(tmp_path, tiny_llama, change, match):
    path = shutil.copytree(tiny_llama, tmp_path / "quantized")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {**(AWQ if "version" in change else GPTQ), **change}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        LLM(str(path), num_kv_blocks=16)


@pytest.mark.parametrize("quantization, name", [(GPTQ, "GPTQ"), (compressed_tensors(), "COMPRESSED-TENSORS")])
def test_int8_quantization_of_an_integer_checkpoint_is_refused(tmp_path, smollm2_path, quantization, name):
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, _ = as_quantized(folder, tmp_path / "quantized", quantization)
    with pytest.raises(ValueError, match=f"holds {name} weights, already quantized"):
        LLM(str(path), quantization="int8", num_kv_blocks=16)


def test_integers_of_the_wrong_shape_are_refused_at_load(tmp_path, smollm2_path):
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, _ = as_quantized(folder, tmp_path / "gptq", GPTQ)
    tensors = load_file(path / "model.safetensors")
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):  # down_proj given o_proj's integers
        tensors[f"model.layers.0.mlp.down_proj.{suffix}"] = tensors[f"model.layers.0.self_attn.o_proj.{suffix}"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj.weight: the checkpoint's integers make a \[64, 64\] "
                                         r"weight where the model's config needs \[64, 128\]"):
        LLM(str(path), **ENGINE)
    tensors["model.layers.0.mlp.down_proj.scales"] = tensors["model.layers.0.mlp.down_proj.scales"][:1]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj \(gptq\): GPTQ tensors do not fit together"):
        LLM(str(path), **ENGINE)
