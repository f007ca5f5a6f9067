"""``LLM.update_weights``: new weights written into a running engine give exactly what a fresh engine loaded from
those weights gives (packed, fused, tied, biased, Gemma's (1 + w) norms, Phi's reordered partial-rotary rows), and the
prefix cache does not serve keys and values of the old weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom import LLM
from tests.conftest import save_tiny_model
from tests.engine.test_parity import loom_greedy, varied_prompts


def _state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch,overrides,backend", [
    ("llama", {}, "auto"),  # panel-packed projections, a tied head packed from the embeddings, the C++ layer plan
    ("llama", {}, "torch"),  # plain parameters
    ("qwen2", {"tie_word_embeddings": False}, "auto"),  # packed q/k/v biases, a head of its own
    ("gemma2", {}, "auto"),  # norms stored as (1 + w)
    ("phi3", {"head_dim": 16, "partial_rotary_factor": 0.75}, "auto"),  # q/k rows reordered before packing
    ("granite", {"attention_bias": True, "mlp_bias": True}, "auto"),  # residual multiplier folded into o / down
    ("mixtral", {}, "auto"),  # transformers 5's experts as two 3-D tensors, one projection per expert in Loom
    ("qwen2_moe", {}, "auto"),  # and a shared expert with its gate
    ("deepseek_v3", {}, "auto"),  # latent attention: rotary rows de-interleaved, kv_b_proj read in place
])
def test_updated_engine_equals_a_fresh_one(tmp_path, smollm2_path, arch, overrides, backend):
    old = save_tiny_model(tmp_path / "old", smollm2_path, arch=arch, seed=0, **overrides)
    new = save_tiny_model(tmp_path / "new", smollm2_path, arch=arch, seed=1, **overrides)
    prompts = varied_prompts(6, seed=3)
    llm = LLM(str(old), attention_backend=backend, num_kv_blocks=256)
    before = loom_greedy(llm, prompts, 12)  # fills the prefix cache with the old weights' keys and values
    llm.update_weights(_state(new).items())
    after = loom_greedy(llm, prompts, 12)
    fresh = loom_greedy(LLM(str(new), attention_backend=backend, num_kv_blocks=256), prompts, 12)
    assert after == fresh  # the same kernels on the same values: bit for bit
    assert [ids for ids, _ in after] != [ids for ids, _ in before]


def test_update_weights_empties_the_prefix_cache(tmp_path, smollm2_path):
    old = save_tiny_model(tmp_path / "old", smollm2_path, seed=0)
    new = save_tiny_model(tmp_path / "new", smollm2_path, seed=1)
    llm = LLM(str(old), block_size=4, num_kv_blocks=256)
    shared = varied_prompts(1, seed=5, low=64, high=64)[0]
    loom_greedy(llm, [shared], 4)
    llm.update_weights(_state(new).items())
    hits = llm.engine.block_manager.num_prefix_hit_tokens
    loom_greedy(llm, [shared], 4)
    assert llm.engine.block_manager.num_prefix_hit_tokens == hits  # nothing served from before the update
    loom_greedy(llm, [shared], 4)
    assert llm.engine.block_manager.num_prefix_hit_tokens > hits  # the cache itself still works


def test_update_weights_refuses_quantized_weights(tmp_path, smollm2_path, tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64, quantization="int8")
    with pytest.raises(ValueError, match="quantized"):
        llm.update_weights([("model.norm.weight", torch.ones(64))])


def test_update_weights_refuses_an_incomplete_or_running_update(tmp_path, smollm2_path, tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    state = _state(tiny_llama)
    before = loom_greedy(llm, varied_prompts(2, seed=7), 6)
    partial = {k: torch.zeros_like(v) for k, v in state.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="layers.1.self_attn.qkv_proj.weight"):
        llm.update_weights(partial.items())
    assert loom_greedy(llm, varied_prompts(2, seed=7), 6) == before  # nothing was written
    twice = [(k, v) for k, v in state.items() if "layers.1.self_attn.k_proj" not in k]
    twice.append(("model.layers.1.self_attn.q_proj.weight", state["model.layers.1.self_attn.q_proj.weight"]))
    with pytest.raises(ValueError, match="q_proj.weight is given twice"):  # 3 writes, but no k: not complete
        llm.update_weights(twice)
    fused = torch.cat([state[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    with pytest.raises(ValueError, match="given twice"):  # q, k, v and a fused q/k/v of the same layer
        llm.update_weights([*state.items(), ("model.layers.0.self_attn.qkv_proj.weight", fused)])
    wrong = dict(state, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match=r"down_proj.weight takes a tensor of shape \(64, 128\)"):
        llm.update_weights(wrong.items())
    assert loom_greedy(llm, varied_prompts(2, seed=7), 6) == before
    llm.engine.add_request("busy", prompt_token_ids=[5, 6, 7])
    with pytest.raises(RuntimeError, match="requests are running"):
        llm.update_weights(state.items())
    llm.engine.abort_request("busy")
