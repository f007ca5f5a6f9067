"""Mixtures of experts (Mixtral, Qwen2-MoE with a shared expert and dense layers, Qwen3-MoE, gpt-oss, GLM-4.5,
DeepSeek-V2 / V3 with latent attention)
against HF transformers: greedy ids and logprobs through concurrent prompts, chunked prefill and a prefix hit; the
routing itself equal to HF's router, token by token; each chosen expert run once per layer and step."""

from __future__ import annotations

import pytest
import torch

from loom import LLM
from loom.models.llama import MLP, SparseMoE
from tests.conftest import save_tiny_model
from tests.engine.test_parity import assert_parity, hf_greedy, loom_greedy, varied_prompts

CASES = {
    "mixtral": ("mixtral", {}),
    "qwen2-moe-shared-expert": ("qwen2_moe", dict(shared_expert_intermediate_size=96, mlp_only_layers=[1])),
    "qwen3-moe-normalised": ("qwen3_moe", dict(norm_topk_prob=True, head_dim=16)),
    "gpt-oss": ("gpt_oss", {}),  # top-k before the softmax, router and expert biases, clamped SwiGLU, sinks
    "glm4-moe": ("glm4_moe", {}),  # sigmoid scores + correction bias, groups, scaling, an ungated shared expert
    "granite-moe": ("granite_moe", {}),  # top-k of the logits then softmax; Granite's four multipliers
    "olmoe-clip-qkv": ("olmoe", dict(clip_qkv=1.5)),  # q/k norms over all heads, weights not renormalised, clamps
    # latent attention (interleaved rotary rows; V3: a query bottleneck and YaRN's mscale on every score), V2's
    # group-limited softmax router with scaled weights, V3's sigmoid one
    "deepseek-v2": ("deepseek_v2", {}),
    "deepseek-v3": ("deepseek_v3", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def moe_model(request, tmp_path_factory, smollm2_path):
    arch, overrides = CASES[request.param]
    return save_tiny_model(tmp_path_factory.mktemp(request.param), smollm2_path, arch=arch, **overrides)


def test_moe_matches_hf_with_chunks_and_a_prefix_hit(moe_model):
    shared = varied_prompts(1, seed=5, low=40, high=40)[0]
    prompts = varied_prompts(6, seed=3, low=10, high=120) + [shared + [101, 102], shared + [103]]
    # 32-token steps: long prompts run in chunks beside the others' decodes; the last prompt hits the cache
    llm = LLM(str(moe_model), num_kv_blocks=256, block_size=8, max_num_batched_tokens=32)
    ours = loom_greedy(llm, prompts, 12)
    assert_parity(ours, hf_greedy(moe_model, prompts, 12))
    assert llm.engine.stats().prefix_hit_rate > 0


def test_routing_equals_hf_router_token_by_token(moe_model):
    from transformers import AutoModelForCausalLM

    ids = varied_prompts(1, seed=9, low=50, high=50)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(moe_model), dtype=torch.float32).eval()
    hf_routes: list[torch.Tensor] = []
    for layer in hf.model.layers:
        mlp = getattr(layer, "mlp", None) or layer.block_sparse_moe  # Granite MoE: block_sparse_moe
        router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)  # gpt-oss, Granite MoE: router
        if router is not None and hasattr(mlp, "experts"):
            router.register_forward_hook(lambda m, args, out: hf_routes.append(out[2]))
    with torch.inference_mode():
        hf(torch.tensor([ids]))

    llm = LLM(str(moe_model), num_kv_blocks=64, block_size=8)
    ours: list[torch.Tensor] = []
    moe_layers = [layer.mlp for layer in llm.engine.model.layers if isinstance(layer.mlp, SparseMoE)]
    for moe in moe_layers:
        route = moe.route
        moe.route = lambda x, route=route: (out := route(x), ours.append(out[1]))[0]
    loom_greedy(llm, [ids], 1)  # one prefill of the whole prompt
    assert len(ours) == len(hf_routes) == len(moe_layers) > 0
    for mine, theirs in zip(ours, hf_routes):  # the same experts per token (DeepSeek's top-k is not sorted)
        assert torch.equal(mine.sort(-1)[0], theirs.reshape(mine.shape).sort(-1)[0])


def test_each_chosen_expert_runs_once_per_layer_and_step(tmp_path, smollm2_path):
    path = save_tiny_model(tmp_path / "mixtral", smollm2_path, arch="mixtral")
    llm = LLM(str(path), num_kv_blocks=256, block_size=8)
    calls: dict[int, int] = {}
    for layer in llm.engine.model.layers:
        for expert in layer.mlp.experts:
            expert.register_forward_hook(lambda m, a, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
    engine = llm.engine
    for i, ids in enumerate(varied_prompts(16, seed=2, low=5, high=20)):
        engine.add_request(str(i), prompt_token_ids=ids)
    engine.step()  # 16 prompts in one step: ~16 x 15 tokens, 2 experts each
    assert calls and max(calls.values()) == 1
    assert sum(calls.values()) <= 8 * len(engine.model.layers)


def test_qwen2_moe_keeps_its_dense_layers(tmp_path, smollm2_path):
    arch, overrides = CASES["qwen2-moe-shared-expert"]
    path = save_tiny_model(tmp_path / "q", smollm2_path, arch=arch, **overrides)
    layers = LLM(str(path), num_kv_blocks=16).engine.model.layers
    assert isinstance(layers[0].mlp, SparseMoE) and layers[0].mlp.shared_expert is not None
    assert type(layers[1].mlp) is MLP


def test_tensor_parallel_ranks_hold_complementary_slices_of_every_expert():
    """The shard arithmetic behind the step-by-step checks in test_tensor_parallel.py: the ranks' expert and shared
    columns tile each width, the local configs carry them, and a width narrower than the ranks is refused."""
    from loom.distributed.parallel import head_shard, local_config
    from loom.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                      max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False, o_bias=False,
                      mlp_bias=False, architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=13, shared_expert_intermediate_size=7, moe_layers=(0,))
    shards = [head_shard(cfg, rank, 3) for rank in range(3)]
    assert [s.moe_intermediate for s in shards] == [(0, 5), (5, 9), (9, 13)]
    assert [s.shared_intermediate for s in shards] == [(0, 3), (3, 5), (5, 7)]
    assert [local_config(cfg, r, 3).moe_intermediate_size for r in range(3)] == [5, 4, 4]
    with pytest.raises(ValueError, match="exceeds the shared expert's width 7"):
        head_shard(cfg, 0, 8)


def _adapter_serves_as_peft(tmp_path, base, targets: list[str]):
    """A random peft adapter on ``targets`` of model ``base``, served unmerged: peft's greedy ids, not the base's.
    Returns (the engine, its prompts, their sampling params)."""
    from loom import LoRARequest, SamplingParams
    from tests.engine.test_lora import hf_greedy, make_adapter

    peft = make_adapter(tmp_path / "adapter", base, seed=3, r=4, alpha=8, targets=targets)
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, num_kv_blocks=64)
    prompts = varied_prompts(3, seed=4, low=5, high=30)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                      lora_request=LoRARequest("a", 1, str(tmp_path / "adapter")))]
    assert got == [hf_greedy(peft, p) for p in prompts]
    assert got != [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    return llm, prompts, params


def test_adapters_on_a_moe_model_serve_attention_and_refuse_experts(tmp_path, smollm2_path):
    """``enable_lora`` on a mixture of experts (Qwen3-MoE with a dense layer 1, whose MLP takes adapter slots as any
    dense model's): an adapter on the attention projections, served unmerged, gives peft's ids; one that claims an MLP
    of an MoE layer (peft names no such module there; written by hand) is refused with the reason."""
    import json

    from safetensors.torch import save_file

    from loom import LoRARequest

    arch, overrides = CASES["qwen3-moe-normalised"]
    base = save_tiny_model(tmp_path / "base", smollm2_path, arch=arch, mlp_only_layers=[1], **overrides)
    llm, prompts, params = _adapter_serves_as_peft(tmp_path, base, ["q_proj", "v_proj", "o_proj"])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                         "target_modules": ["gate_proj"]}))
    save_file({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": torch.zeros(96, 4)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="mixture of experts in this model"):
        llm.generate([{"prompt_token_ids": prompts[0]}], params, lora_request=LoRARequest("bad", 2, str(bad)))


def test_glm_checkpoints_multi_token_prediction_layer_is_left_out(tmp_path, smollm2_path):
    """GLM-4.5's files hold one more layer than the config's count (its MTP head, for speculative decoding in vLLM);
    Loom serves the model without it, as transformers does."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_model(tmp_path / "glm", smollm2_path, arch="glm4_moe")
    tensors = load_file(path / "model.safetensors")
    extra = {k.replace(".layers.2.", ".layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    save_file({**tensors, **extra, "model.layers.3.eh_proj.weight": torch.zeros(64, 128)}, path / "model.safetensors",
              metadata={"format": "pt"})
    prompts = varied_prompts(3, seed=6, low=10, high=30)
    ours = loom_greedy(LLM(str(path), num_kv_blocks=64, block_size=8), prompts, 6)
    assert_parity(ours, hf_greedy(path, prompts, 6))


def test_glm_routers_stay_float32_in_a_bfloat16_model(tmp_path, smollm2_path):
    """Correction biases around 1.0 differ by ~0.01, less than bfloat16's step there (0.0078): rounded, they would
    send tokens to other experts. The same bfloat16 inputs routed by Loom and by transformers' router (which keeps
    its weights in float32) pick the same experts."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "glm", smollm2_path, arch="glm4_moe")
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = 1.0 + torch.randn(tensors[name].shape, generator=g) * 0.01
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    moe = next(layer.mlp for layer in LLM(str(path), num_kv_blocks=16, dtype="bfloat16").engine.model.layers
               if isinstance(layer.mlp, SparseMoE))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    router = next(layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "experts"))
    x = torch.randn(2000, 64, generator=g).to(torch.bfloat16)
    weights, experts = moe.route(x)
    _, hf_weights, hf_experts = router(x)
    assert torch.equal(experts.sort(-1).values, hf_experts.sort(-1).values)
    torch.testing.assert_close(weights.float().sort(-1).values, hf_weights.float().sort(-1).values, atol=1e-2,
                               rtol=1e-2)


def test_a_glm_model_without_shared_experts_loads(tmp_path, smollm2_path):
    """n_shared_experts 0: the checkpoint holds zero-width shared-expert tensors; Loom builds no shared expert."""
    path = save_tiny_model(tmp_path / "glm", smollm2_path, arch="glm4_moe", n_shared_experts=0)
    prompts = varied_prompts(2, seed=7, low=10, high=30)
    assert_parity(loom_greedy(LLM(str(path), num_kv_blocks=64, block_size=8), prompts, 6), hf_greedy(path, prompts, 6))


def test_latent_attention_caches_one_latent_per_token(tmp_path, smollm2_path):
    """DeepSeek's cache per layer is one tensor of [latent, rotary key] rows, the keys' and values' alike, and what a
    prefill writes there is transformers' compressed KV of the same tokens: the normed latent and the rotated key
    (transformers rotates the interleaved pairs into rotate-half order, as Loom holds them)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    from loom.engine.model_runner import kv_bytes_per_block

    path = save_tiny_model(tmp_path / "v3", smollm2_path, arch="deepseek_v3")
    llm = LLM(str(path), num_kv_blocks=16, block_size=8)
    model, caches = llm.engine.model, llm.engine.runner.kv_caches
    assert all(k is v and k.shape[1:] == (8, 1, 40) for k, v in caches)
    assert kv_bytes_per_block(model, 8, torch.float32) == 3 * 8 * 40 * 4
    ids = varied_prompts(1, seed=2, low=20, high=20)[0]
    loom_greedy(llm, [ids], 1)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    seen = []
    attn = hf.model.layers[1].self_attn
    attn.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    with torch.inference_mode():
        hf(torch.tensor([ids]))
        kv = attn.kv_a_proj_with_mqa(seen[0]["hidden_states"])
        cos, sin = seen[0]["position_embeddings"]
        k_pe = kv[:, None, :, 32:]
        k_rot = apply_rotary_pos_emb_interleave(k_pe, k_pe, cos, sin)[1][0, 0]
    expected = torch.cat([attn.kv_a_layernorm(kv[0, :, :32]), k_rot], dim=-1)  # its rotation: rotate-half order
    blocks = llm.engine.block_manager.find_cached_prefix(ids)  # the prompt's two full blocks, kept for reuse
    assert len(blocks) == 2
    slots = [b * 8 + o for b in blocks for o in range(8)]
    torch.testing.assert_close(caches[1][0].view(-1, 40)[slots], expected[:16], atol=1e-5, rtol=1e-5)


def test_adapters_on_latent_attention_serve_o_proj_and_refuse_the_latent_projections(tmp_path, smollm2_path):
    """DeepSeek-V2 (no query bottleneck: a q_proj of its own, not a fused q/k/v): an adapter on o_proj and the dense
    layer's MLP gives peft's ids unmerged; one on q_proj is refused with the reason, not slotted into a fused
    projection the model does not have."""
    from loom import LoRARequest
    from tests.engine.test_lora import make_adapter

    base = save_tiny_model(tmp_path / "base", smollm2_path, arch="deepseek_v2")
    llm, prompts, params = _adapter_serves_as_peft(tmp_path, base, ["o_proj", "0.mlp.down_proj"])
    make_adapter(tmp_path / "q", base, seed=4, r=4, alpha=8, targets=["q_proj"])
    with pytest.raises(ValueError, match="latent attention"):
        llm.generate([{"prompt_token_ids": prompts[0]}], params, lora_request=LoRARequest("q", 2, str(tmp_path / "q")))


def test_granite_moe_takes_transformers_own_weights_in_place(tmp_path, smollm2_path):
    """Granite MoE's hub files name its experts input_linear / output_linear and its router router.layer; a
    transformers model's state_dict names them experts.gate_up_proj / down_proj and router.weight (what GRPO's
    syncs hand over): both load, the residual multiplier folded into every expert's down_proj."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "granite-moe", smollm2_path, arch="granite_moe")
    other = save_tiny_model(tmp_path / "other", smollm2_path, arch="granite_moe", seed=1)
    llm = LLM(str(other), num_kv_blocks=64, block_size=8)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert any("experts.gate_up_proj" in name for name in hf.state_dict())
    llm.update_weights(hf.state_dict().items())
    prompts = varied_prompts(3, seed=8, low=10, high=30)
    assert_parity(loom_greedy(llm, prompts, 6), hf_greedy(path, prompts, 6))
