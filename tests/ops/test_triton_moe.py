"""Triton's grouped-matmul mixture of experts (``loom.ops.triton.moe`` via ``TritonOps.fused_moe``) against the
layer's own grouping (each expert run over its tokens, ``SparseMoE._grouped``), on CPU under Triton's interpreter (on
a CUDA machine they compile): the pairs' alignment by expert, then whole MoE layers with SiLU, GeGLU and gpt-oss'
clamped SwiGLU, biases, float32 and float16, decode-sized and prefill-sized batches, and a whole engine."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # tests/conftest.py sets it before anything imports triton; here for running this file alone too
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loom.models.llama import LlamaConfig, SparseMoE  # noqa: E402
from loom.ops.layers import TorchOps  # noqa: E402
from loom.ops.triton.moe import align_by_expert  # noqa: E402
from loom.ops.triton_ops import TritonOps  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def test_pairs_align_by_expert_in_whole_tiles():
    experts = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3]])
    sorted_ids, block_expert, valid = align_by_expert(experts, num_experts=5, block_m=4)
    pairs = experts.numel()
    assert sorted_ids.numel() == -(-(pairs + 5 * 3) // 4) * 4  # fixed by the shapes, not the routing
    assert int(valid) == 4 * 4  # experts 0 (2 pairs), 1 (1), 2 (1), 3 (4): a tile each
    tiles = sorted_ids[: int(valid)].view(-1, 4)
    for tile, expert in zip(tiles, block_expert[: len(tiles)]):
        live = tile[tile < pairs]
        assert len(live) and all(int(experts.flatten()[p]) == int(expert) for p in live)
        assert live.tolist() == sorted(live.tolist())  # each expert's pairs in order
    assert sorted(sorted_ids[sorted_ids < pairs].tolist()) == list(range(pairs))  # every pair once
    assert (sorted_ids[int(valid):] == pairs).all()


def _moe(arch: dict, dtype: torch.dtype, seed: int) -> SparseMoE:
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False,
                architecture="MixtralForCausalLM", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40)
    torch.manual_seed(seed)
    moe = SparseMoE(LlamaConfig(**{**base, **arch}))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("arch", [
    {},  # Mixtral: SiLU, no biases
    {"hidden_act": "gelu_pytorch_tanh"},
    {"mlp_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "topk_before_softmax": True},  # gpt-oss
])  # fmt: skip
@pytest.mark.parametrize("tokens", [1, 5, 37, 600])  # 1,200 pairs: 64-row tiles
def test_grouped_experts_equal_the_layers_own_grouping(dtype, tol, arch, tokens):
    moe = _moe(arch, dtype, seed=tokens)
    x = torch.randn(tokens, 48, device=DEVICE).to(dtype)
    weights, experts = moe.route(x)
    expected = moe._grouped(x, weights, experts, TorchOps())
    assert moe.stack_experts()
    got = TritonOps().fused_moe(x, weights, experts, moe.stacked, moe.experts[0])
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert moe.experts[2].down_proj.weight.data_ptr() == moe.stacked.down[2].data_ptr()  # views into the stack


def test_stacking_leaves_quantized_experts_alone():
    moe = _moe({}, torch.float32, seed=0)
    moe.experts[1].down_proj = torch.nn.Identity()
    assert not moe.stack_experts() and moe.stacked is None


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])  # a gated shared expert; biases and the clamped SwiGLU
def test_a_moe_model_on_the_triton_backend_runs_its_experts_grouped(tmp_path, smollm2_path, arch):
    """The whole engine (chunked prefill, decode) with every MoE layer's experts stacked and run by the grouped
    kernels gives the plain-PyTorch backend's tokens and log-probabilities; the same through the CUDA-graph path's
    padded static buffers (run eagerly here), which a MoE may now take: its forward asks the host for nothing."""
    from loom import LLM
    from loom.engine.cuda_graphs import DecodeGraphs
    from loom.engine.llm_engine import no_host_syncs
    from tests.conftest import save_tiny_model
    from tests.engine.test_cuda_graphs import _run
    from tests.engine.test_parity import assert_parity, loom_greedy, varied_prompts

    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch)
    # float32 on either device (on a GPU the kernels compile); eager, the padded graph path built by hand below
    engine = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=32, max_num_seqs=8, device=DEVICE,
                  dtype="float32", enforce_eager=True)
    prompts = varied_prompts(3, seed=31, low=5, high=30)
    triton = LLM(str(path), attention_backend="triton", **engine)
    layers = [m for m in triton.engine.model.modules() if isinstance(m, SparseMoE)]
    assert layers and all(m.stacked is not None for m in layers) and no_host_syncs(triton.engine.model)
    reference = LLM(str(path), attention_backend="torch", **engine)
    assert not no_host_syncs(reference.engine.model)  # the reference counts tokens per expert on the host
    assert_parity(loom_greedy(triton, prompts, 6), loom_greedy(reference, prompts, 6), atol=1e-4)

    plain = _run(triton.engine, prompts)
    runner = triton.engine.runner
    pools = [(torch.cat([k, torch.zeros_like(k[:1])]), torch.cat([v, torch.zeros_like(v[:1])]))
             for k, v in runner.kv_caches]  # one scratch block past the pool
    runner.kv_caches = [(k[:-1], v[:-1]) for k, v in pools]
    runner.graphs = DecodeGraphs(triton.engine.model, pools, torch.device(DEVICE), max_num_seqs=8,
                                 max_blocks_per_seq=8, block_size=8, scratch_block=64, capture=False)
    padded = _run(triton.engine, prompts)
    assert padded.keys() == plain.keys()
    for key in plain:
        assert padded[key][0] == plain[key][0]
        assert max(abs(a - b) for a, b in zip(padded[key][1], plain[key][1])) < 1e-4
