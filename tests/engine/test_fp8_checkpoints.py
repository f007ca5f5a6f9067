"""FP8 checkpoints, expanded at load (``loom.models.fp8``): transformers' fine-grained block format served as
transformers runs it; block tiles that do not divide a weight, compressed-tensors' per-channel scheme and a mixture
of experts against the same weights expanded by hand; and what Loom must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM
from loom.models.fp8 import quantize_fp8
from tests.conftest import save_tiny_model
from tests.engine.test_parity import assert_parity, hf_greedy, loom_greedy, varied_prompts

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expand_by_hand(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """Each weight times its own tile's (or row's) scale, element by element: the reference for the loader."""
    out = q.float().clone()
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] *= scale[i, 0] if block is None else scale[i // block[0], j // block[1]]
    return out


def as_fp8(folder, target, quantization: dict, block: tuple[int, int] | None, scale_name: str):
    """``folder``'s float checkpoint with every projection in float8 e4m3 beside its scales (``scale_name``), written
    to ``target``; and beside it ``target``-float, the same model with the expanded weights (the reference)."""
    shutil.copytree(folder, target)
    reference = Path(shutil.copytree(folder, f"{target}-float"))
    fp8, expanded = {}, {}
    for name, tensor in load_file(target / "model.safetensors").items():
        if name.removesuffix(".weight").endswith(PROJECTIONS) and name.endswith(".weight"):
            q, scale = quantize_fp8(tensor, block)
            fp8[name], fp8[name.removesuffix("weight") + scale_name] = q, scale
            expanded[name] = expand_by_hand(q, scale, block)
        else:
            fp8[name] = expanded[name] = tensor
    return write_quantized(target, reference, fp8, expanded, quantization)


def write_quantized(target: Path, reference: Path, quantized: dict, expanded: dict, quantization: dict):
    """A quantized checkpoint's tensors into ``target`` (its config given ``quantization``) and the weights they
    stand for into ``reference``; returns both folders."""
    save_file(quantized, target / "model.safetensors", metadata={"format": "pt"})
    save_file(expanded, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = quantization
    (target / "config.json").write_text(json.dumps(config))
    return target, reference


def per_expert(folder: Path) -> Path:
    """A MoE checkpoint with one tensor per expert projection, as the hub's quantized MoE folders hold them
    (transformers 5 saves them fused)."""
    tensors = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            for e in range(tensor.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = tensor[e].chunk(2)
                    tensors[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    tensors[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    tensors[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            tensors[name] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


FINE_GRAINED = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 32]}


def test_a_fine_grained_fp8_checkpoint_serves_as_transformers_runs_it(tmp_path, smollm2_path):
    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch="qwen3")
    path, _ = as_fp8(folder, tmp_path / "fp8", FINE_GRAINED, (32, 32), "weight_scale_inv")
    prompts = varied_prompts(4, seed=2, low=10, high=40)
    reference = hf_greedy(path, prompts, 8)  # transformers expands FP8 itself on a machine without FP8 kernels
    ours = loom_greedy(LLM(str(path), num_kv_blocks=64, block_size=8, max_num_batched_tokens=32), prompts, 8)
    assert_parity(ours, reference)
    floats = loom_greedy(LLM(str(folder), num_kv_blocks=64, block_size=8), prompts, 8)
    assert max(abs(a - b) for (_, x), (_, y) in zip(ours, floats) for a, b in zip(x, y)) > 1e-3  # FP8 moved them


@pytest.mark.parametrize("scheme", ["partial-blocks", "compressed-tensors-channel", "moe-blocks"])
def test_fp8_layouts_expand_to_the_weights_each_tile_or_row_scales(tmp_path, smollm2_path, scheme):
    """Tiles of 24 x 40 leave partial ones at every edge of 64- and 128-wide weights (transformers refuses them;
    vLLM and Loom crop the scale grid); compressed-tensors' FP8-dynamic has a scale per output row; Qwen3-MoE's
    experts each have their own tiles."""
    arch, block, scale_name = "qwen3", (24, 40), "weight_scale_inv"
    quantization = {**FINE_GRAINED, "weight_block_size": list(block)}
    if scheme == "compressed-tensors-channel":
        block, scale_name = None, "weight_scale"
        quantization = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                        "input_activations": {"type": "float", "num_bits": 8, "dynamic": True}}}}
    elif scheme == "moe-blocks":
        arch = "qwen3_moe"
    folder = save_tiny_model(tmp_path / "float", smollm2_path, arch=arch, head_dim=16)
    if arch == "qwen3_moe":
        per_expert(folder)
    path, reference = as_fp8(folder, tmp_path / "fp8", quantization, block, scale_name)
    prompts = varied_prompts(4, seed=3, low=10, high=40)
    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=32)
    ours = loom_greedy(LLM(str(path), **engine), prompts, 8)
    assert ours == loom_greedy(LLM(str(reference), **engine), prompts, 8)  # the same weights: the same floats


@pytest.mark.parametrize("quantization, match", [
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"group_0": {
        "weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}}}}, "format 'marlin-24'"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "weights": {"type": "int", "num_bits": 8, "strategy": "channel"},
        "input_activations": {"type": "int", "num_bits": 8, "dynamic": True}}}}, "input activations quantized"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}},
        "group_1": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}}}},
     "scheme 'group_0'"),
])  # fmt: skip
def test_quantized_checkpoints_loom_cannot_read_are_refused(tmp_path, tiny_llama, quantization, match):
    path = shutil.copytree(tiny_llama, tmp_path / "quantized")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        LLM(str(path), num_kv_blocks=16)


def test_an_fp8_weight_without_its_scale_is_refused(tmp_path, smollm2_path):
    folder = save_tiny_model(tmp_path / "float", smollm2_path)
    path, _ = as_fp8(folder, tmp_path / "fp8", FINE_GRAINED, (32, 32), "weight_scale_inv")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_proj.weight in .* is torch.float8_e4m3fn without a weight_scale"):
        LLM(str(path), num_kv_blocks=16)
