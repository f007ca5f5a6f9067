"""Numerical parity with HF transformers: greedy ids identical for varied prompts run concurrently, each equal
to the same prompt run alone; logprobs within tolerance; chunked prefill on/off; Qwen2 bias and Llama-3 rope;
SmolLM3's NoPE layers and Granite's multipliers; sliding windows (Mistral, Phi-3, SmolLM3) and Gemma 2 / 3 past their
windows."""

from __future__ import annotations

import random

import pytest
import torch

from loom import LLM, SamplingParams
from tests.conftest import save_tiny_model

# float32 logprobs of the chosen tokens. HF's matmuls run in MKL; Loom's CPU backend packs its weights for oneDNN,
# which sums in another order: on SmolLM2 the largest gap seen was 1.1e-4 (typically 1-3e-5); with
# attention_backend="torch" (MKL, as HF) it stays under 2e-5. Greedy ids must match exactly either way.
LOGPROB_ATOL_FP32 = 2.5e-4


def varied_prompts(n: int, seed: int = 0, low: int = 3, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(low, high))] for _ in range(n)]


def hf_greedy(path, prompts: list[list[int]], max_new: int, **load) -> list[tuple[list[int], list[float]]]:
    """``load``: more arguments to ``from_pretrained`` (a quantization config, say)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **load).eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            g = model.generate(
                torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=2,
            )  # fmt: skip
            new = g.sequences[0, len(ids) :].tolist()
            lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(g.logits, new)]
            results.append((new, lps))
    return results


def loom_greedy(llm: LLM, prompts: list[list[int]], max_new: int):
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [
        (o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs
    ]


def teacher_forced_agreement(llm: LLM, prompts: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where ``llm``'s greedy next token, given the prompt and the reference's tokens before that
    position, is the reference's token. Unlike comparing two free-running greedy outputs, one near-tie flip does not
    make every later position count as a disagreement."""
    forced = [p + list(ref[:i]) for p, ref in zip(prompts, reference) for i in range(len(ref))]
    outs = llm.generate([{"prompt_token_ids": p} for p in forced], SamplingParams(temperature=0, max_tokens=1))
    expected = [t for ref in reference for t in ref]
    return sum(o.outputs[0].token_ids[0] == t for o, t in zip(outs, expected, strict=True)) / len(expected)


def assert_parity(ours, reference, atol=LOGPROB_ATOL_FP32):
    for i, ((ids, lps), (ref_ids, ref_lps)) in enumerate(zip(ours, reference, strict=True)):
        assert ids == ref_ids, f"prompt {i}: token ids differ"
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < atol, f"prompt {i}: logprobs differ"


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    # Small blocks and a small token budget force chunked prefill and mixed prefill/decode steps.
    return LLM(str(tiny_llama), block_size=4, max_num_batched_tokens=64, num_kv_blocks=2048)


def test_tiny_llama_concurrent_matches_hf_and_alone(tiny_llama, tiny_engine):
    prompts = varied_prompts(16)
    reference = hf_greedy(tiny_llama, prompts, max_new=20)
    together = loom_greedy(tiny_engine, prompts, 20)
    assert_parity(together, reference)
    alone = [loom_greedy(tiny_engine, [p], 20)[0] for p in prompts]
    assert [a[0] for a in alone] == [t[0] for t in together]


def test_chunked_prefill_on_and_off_give_same_tokens(tiny_llama, tiny_engine):
    prompts = varied_prompts(8, seed=1, low=40, high=200)
    chunked = loom_greedy(tiny_engine, prompts, 12)
    whole = LLM(str(tiny_llama), enable_chunked_prefill=False, max_num_batched_tokens=4096, num_kv_blocks=512)
    assert [c[0] for c in chunked] == [w[0] for w in loom_greedy(whole, prompts, 12)]


def test_prefix_cache_hit_gives_same_tokens(tiny_engine):
    shared = varied_prompts(1, seed=5, low=64, high=64)[0]
    prompts = [shared + tail for tail in varied_prompts(4, seed=6, low=2, high=9)]
    first = loom_greedy(tiny_engine, prompts, 10)
    before = tiny_engine.engine.block_manager.num_prefix_hit_tokens
    again = loom_greedy(tiny_engine, prompts, 10)
    assert tiny_engine.engine.block_manager.num_prefix_hit_tokens > before
    assert [a[0] for a in again] == [f[0] for f in first]


def test_torch_and_cpp_decode_backends_agree(tiny_llama):
    prompts = varied_prompts(6, seed=2)
    ref = loom_greedy(LLM(str(tiny_llama), attention_backend="torch", num_kv_blocks=256), prompts, 16)
    fast = loom_greedy(LLM(str(tiny_llama), attention_backend="auto", num_kv_blocks=256), prompts, 16)
    assert_parity(fast, ref)


@pytest.mark.parametrize("arch,overrides,fused", [
    ("llama", {}, True),
    ("qwen2", {}, True),  # q/k/v biases
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}, True),
    ("qwen3", {"head_dim": 32}, True),  # q/k norms
    ("mistral", {"sliding_window": 24, "head_dim": 16}, True),  # every layer windowed, blocks given back
    ("phi3", {"sliding_window": 20, "head_dim": 16}, True),
    # alternate layers windowed (16), soft caps low enough to bend a tiny model's scores, GeGLU, sandwich norms
    ("gemma2", {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0}, True),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"]}, True),  # q/k norms, two rope bases
    ("smollm3", {}, True),  # layer 1 without rotary
    ("granite", {"attention_bias": True, "mlp_bias": True}, True),  # multipliers, o/down biases scaled too
    ("phi3", {"sliding_window": 20, "head_dim": 16, "partial_rotary_factor": 0.75}, True),  # Phi-4-mini's rotary
    ("olmo2", {}, False),  # norms after the branches and over all heads: op by op
    ("mixtral", {}, False),
], ids=["llama", "qwen2-qkv-bias", "llama-all-biases-untied", "qwen3-qk-norm", "mistral-window", "phi3-window",
       "gemma2-softcap", "gemma3-dual-rope", "smollm3-nope", "granite-multipliers", "phi3-partial-rotary",
       "olmo2-post-norms", "mixtral"])  # fmt: skip
def test_fused_decode_layers_compute_exactly_what_the_op_by_op_layers_do(tmp_path, smollm2_path, monkeypatch, arch,
                                                                          overrides, fused):
    """CpuOps.decode_layers runs each dense layer of a decode-only step in one C++ call chaining the same kernels in
    the same order as the op-by-op path, so logprobs are identical, not merely close; models with layers it does not
    compute (experts) are left to the op-by-op path. Prompts of up to 70 tokens run past the windows."""
    from loom.ops.cpu_kernels import CpuOps

    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides)
    _randomize_norms(path)  # q/k norms too: a swapped or unused weight must show
    ops = _layer_calls_match_op_by_op(monkeypatch, path, varied_prompts(5, seed=21, low=3, high=70))
    assert isinstance(ops, CpuOps)
    assert bool(ops._decode_plan) is fused


@pytest.mark.parametrize("weights", ["gguf-qwen2", "gguf-qwen3", "gguf-gemma2", "quantization-int8", "gptq-act-order"])
def test_fused_decode_layers_on_int8_executed_weights_compute_what_the_op_by_op_layers_do(tmp_path, smollm2_path,
                                                                                           monkeypatch, weights):
    """The same for projections the int8 kernels execute: GGUF files' (Q8_0, Q4_1 and Q4_0 blocks; qwen2's q/k/v
    biases, qwen3's q/k norms, gemma2's windows, soft caps, GeGLU and sandwich norms) and an HF folder's under
    --quantization int8 (gguf_decode_layer), and a GPTQ folder with act-order groups, whose projections read their
    input's columns in an order of their own (gathered inside the call)."""
    from tests.engine.test_gguf_archs import write_tiny_gguf
    from tests.engine.test_int_quant_checkpoints import GPTQ, as_quantized

    if weights.startswith("gguf"):
        arch = weights.split("-")[1]
        path, kwargs = tmp_path / f"tiny-{arch}.gguf", {"tokenizer": str(smollm2_path)}
        write_tiny_gguf(path, arch)
    elif weights == "gptq-act-order":
        path, _ = as_quantized(save_tiny_model(tmp_path / "float", smollm2_path, arch="qwen2"), tmp_path / "gptq",
                               {**GPTQ, "desc_act": True})
        kwargs = {}
    else:
        path, kwargs = save_tiny_model(tmp_path / "llama", smollm2_path), {"quantization": "int8"}
    prompts = [[t % 1000 for t in p] for p in varied_prompts(5, seed=22, low=3, high=70)]  # the GGUF's vocab: 1024
    ops = _layer_calls_match_op_by_op(monkeypatch, path, prompts, **kwargs)
    assert ops._decode_plan[0][0].__name__ == "gguf_decode_layer"
    assert (len(ops._decode_plan[0][2]) == 20) is (weights == "gptq-act-order")  # each projection's input order


def _layer_calls_match_op_by_op(monkeypatch, path, prompts, **kwargs):
    """Asserts that greedy ids and logprobs with the whole-layer decode calls equal those of an engine without them;
    returns the first engine's ops (its layer plan made)."""
    from loom.ops.cpu_kernels import CpuOps

    llm = LLM(str(path), num_kv_blocks=256, block_size=8, **kwargs)
    out = loom_greedy(llm, prompts, 12)
    monkeypatch.setattr(CpuOps, "decode_layers", lambda *args: None)
    assert loom_greedy(LLM(str(path), num_kv_blocks=256, block_size=8, **kwargs), prompts, 12) == out
    return llm.engine.model.ops


def test_mistral_gives_back_blocks_behind_its_window_and_still_matches_hf(tmp_path, smollm2_path):
    """Every layer windowed (24 tokens, blocks of 8): a sequence holds at most 5 blocks however long it runs, the
    blocks it gives back go to the others (a pool too small for all contexts at once), and outputs match HF."""
    path = save_tiny_model(tmp_path / "mistral", smollm2_path, arch="mistral", sliding_window=24, head_dim=16)
    prompts = varied_prompts(6, seed=11, low=20, high=60)
    llm = LLM(str(path), num_kv_blocks=40, block_size=8, max_num_batched_tokens=64)  # 6 x (60 + 48) / 8 > 40
    engine = llm.engine
    held = []
    step = engine.step

    def watching():
        outs = step()
        held.extend(sum(1 for b in engine.block_manager.block_table(s.seq_id) if b >= 0)
                    for s in engine.scheduler.running)
        return outs

    engine.step = watching
    assert_parity(loom_greedy(llm, prompts, 48), hf_greedy(path, prompts, 48))
    assert max(held) <= 5 and engine.stats().num_preemptions == 0


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("qwen2", {}),
        ("llama", {"attention_bias": True}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
        ("qwen3", {"head_dim": 32}),
        ("qwen3", {"head_dim": 16, "attention_bias": True}),
        ("phi3", {"sliding_window": None}),
        ("smollm3", {}),  # every second layer NoPE
        ("granite", {}),  # embedding, attention, residual and logit multipliers
        ("granite", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
        ("phi3", {"sliding_window": None, "head_dim": 16, "partial_rotary_factor": 0.75}),  # Phi-4-mini's rotary
    ],
    ids=["qwen2-qkv-bias", "llama-attention-bias", "llama3-rope-scaling", "untied-mha", "qwen3-qk-norm",
         "qwen3-qk-norm-bias", "phi3-fused-checkpoint", "smollm3-nope", "granite-multipliers",
         "granite-biases-untied", "phi3-partial-rotary"],
)  # fmt: skip
def test_family_variants_match_hf(tmp_path, smollm2_path, arch, overrides):
    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides)
    prompts = varied_prompts(4, seed=3, low=10, high=120)
    assert_parity(
        loom_greedy(LLM(str(path), num_kv_blocks=256, block_size=8), prompts, 12), hf_greedy(path, prompts, 12)
    )


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.2, 1.9, 2.9, 4.4, 6.6, 9.9, 14.8, 22.0], "original_max_position_embeddings": 64}


def test_phi3_longrope_matches_hf_within_the_original_context(tmp_path, smollm2_path):
    """LongRoPE: short factors and the attention factor (1024 / 64 context) change every score; HF and Loom agree
    while sequences stay within the original 64 positions."""
    path = save_tiny_model(tmp_path / "phi3", smollm2_path, arch="phi3", head_dim=16, sliding_window=None,
                           max_position_embeddings=1024, rope_parameters={"rope_theta": 10000.0, **LONGROPE},
                           original_max_position_embeddings=64)
    prompts = varied_prompts(6, seed=13, low=5, high=48)
    ours = loom_greedy(LLM(str(path), num_kv_blocks=256, block_size=8), prompts, 16)
    assert_parity(ours, hf_greedy(path, prompts, 16))


def test_phi4_mini_partial_rotary_with_longrope_matches_hf_within_the_original_context(tmp_path, smollm2_path):
    """Phi-4-mini's rotary: LongRoPE on the first 3/4 of each head (factors for those 12 of 16 dimensions), the rest
    passed through; run by full-width kernels over padded tables with q/k rows reordered at load."""
    scaling = {**LONGROPE, "short_factor": LONGROPE["short_factor"][:6], "long_factor": LONGROPE["long_factor"][:6]}
    path = save_tiny_model(tmp_path / "phi4", smollm2_path, arch="phi3", head_dim=16, sliding_window=None,
                           partial_rotary_factor=0.75, max_position_embeddings=1024,
                           rope_parameters={"rope_theta": 10000.0, **scaling}, original_max_position_embeddings=64)
    _randomize_norms(path)
    prompts = varied_prompts(6, seed=14, low=5, high=48)
    llm = LLM(str(path), num_kv_blocks=256, block_size=8, max_num_batched_tokens=16)
    assert llm.engine.model.config.rotary_dim == 12
    assert_parity(loom_greedy(llm, prompts, 16), hf_greedy(path, prompts, 16))


def test_partial_rotary_order_runs_hf_partial_rotation_through_full_width_tables():
    """The identity behind partial rotary: rotating q by HF's partial rule equals reordering its dimensions, rotating
    by the padded full-width tables and ordering back; q . k of two positions is the same either way."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from loom.ops.layers import rotate_half
    from loom.ops.rotary import RotaryEmbedding, partial_rotary_order

    head_dim, rotary_dim, positions = 16, 12, torch.tensor([0, 3, 40])
    order = partial_rotary_order(head_dim, rotary_dim)
    assert sorted(order.tolist()) == list(range(head_dim))
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, torch.float32, rotary_dim)
    q, k = torch.randn(3, 2, head_dim), torch.randn(3, 2, head_dim)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    emb = torch.cat([positions[:, None].float() * inv_freq] * 2, dim=-1)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None],
                                      emb.sin()[None])
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)  # as TorchOps rotates
    ours_q = q[..., order] * cos + rotate_half(q[..., order]) * sin
    ours_k = k[..., order] * cos + rotate_half(k[..., order]) * sin
    back = torch.argsort(order)
    torch.testing.assert_close(ours_q[..., back], hf_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k[..., back], hf_k[0].transpose(0, 1))


def test_longrope_tables_take_the_long_factors_past_the_original_context():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loom.ops.rotary import RotaryEmbedding

    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024,
                        rope_parameters={"rope_theta": 10000.0, **LONGROPE}, original_max_position_embeddings=64)
    scaling = {**LONGROPE, "max_position_embeddings": 1024}
    rotary = RotaryEmbedding(16, 200, 10000.0, scaling, torch.float32)
    for seq_len, positions in ((None, range(0, 64)), (65, range(64, 200))):
        inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)
        pos = torch.tensor(list(positions), dtype=torch.float32)[:, None]
        emb = torch.cat([pos * inv_freq[None, :]] * 2, dim=-1)
        torch.testing.assert_close(rotary.cos[list(positions)], emb.cos() * attention)
        torch.testing.assert_close(rotary.sin[list(positions)], emb.sin() * attention)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("scaling", [
    YARN,  # Qwen2.5 / Qwen3's long-context setting, shrunk
    {**YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {**YARN, "attention_factor": 0.7},
    {**YARN, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.7},  # DeepSeek's form of the attention factor
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256},  # factor from the two contexts
], ids=["qwen", "betas-untruncated", "attention-factor", "deepseek-mscale", "factor-from-contexts"])  # fmt: skip
def test_yarn_tables_equal_transformers(scaling):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loom.ops.rotary import RotaryEmbedding

    config = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=1024,
                         rope_parameters={"rope_theta": 10000.0, **scaling})
    inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](config, None)
    rotary = RotaryEmbedding(32, 300, 10000.0, {**scaling, "max_position_embeddings": 1024}, torch.float32)
    pos = torch.arange(300, dtype=torch.float32)[:, None]
    emb = torch.cat([pos * inv_freq[None, :]] * 2, dim=-1)
    assert attention != 1.0 and not torch.allclose(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 32, 2) / 32))
    torch.testing.assert_close(rotary.cos, emb.cos() * attention)
    torch.testing.assert_close(rotary.sin, emb.sin() * attention)


def test_yarn_extends_the_context_to_the_original_times_the_factor_as_vllm_does():
    """Qwen2.5's documented setting: max_position_embeddings stays 32,768, yarn factor 4 over 32,768 serves 131,072."""
    from transformers import Qwen2Config

    from loom.engine.config import EngineConfig, model_context

    qwen = Qwen2Config(max_position_embeddings=32768, rope_parameters={
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert model_context(qwen) == 131072
    assert EngineConfig(max_model_len=131072).context_length(qwen) == 131072
    assert EngineConfig(max_model_len=200000).context_length(qwen) == 131072
    assert model_context(Qwen2Config(max_position_embeddings=32768)) == 32768


def test_qwen3_with_yarn_matches_hf_past_the_original_context(tmp_path, smollm2_path):
    path = save_tiny_model(tmp_path / "qwen3", smollm2_path, arch="qwen3", head_dim=16,
                           rope_parameters={"rope_theta": 10000.0, **YARN})
    prompts = varied_prompts(4, seed=17, low=20, high=90)  # past the 32 positions YaRN stretches
    ours = loom_greedy(LLM(str(path), num_kv_blocks=256, block_size=8, max_num_batched_tokens=32), prompts, 12)
    assert_parity(ours, hf_greedy(path, prompts, 12))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_olmo2_post_norms_and_whole_width_qk_norms_match_hf(tmp_path, smollm2_path, backend):
    """OLMo 2: no norm before attention or the MLP, RMSNorm on each one's output before the residual add, q/k norms
    over all heads; every norm randomised so a swapped or skipped one shows; chunked prompts and a prefix hit."""
    path = save_tiny_model(tmp_path / "olmo2", smollm2_path, arch="olmo2", attention_bias=True)
    _randomize_norms(path)
    shared = varied_prompts(1, seed=19, low=40, high=40)[0]
    prompts = varied_prompts(4, seed=20, low=5, high=90) + [shared + [101], shared + [102, 103]]
    llm = LLM(str(path), num_kv_blocks=512, block_size=8, max_num_batched_tokens=32, attention_backend=backend)
    assert llm.engine.model.layers[0].input_layernorm is None
    assert llm.engine.model.layers[0].self_attn.q_norm.weight.shape == (4 * 16,)
    assert_parity(loom_greedy(llm, prompts, 12), hf_greedy(path, prompts, 12))
    assert llm.engine.stats().prefix_hit_rate > 0


def test_qwen3_qk_norm_weights_are_loaded_and_used(tmp_path, smollm2_path):
    """The parity above would also pass if q_norm/k_norm were identity; make them matter and compare again."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "qwen3", smollm2_path, arch="qwen3", head_dim=16)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.2, 3.0)
            layer.self_attn.k_norm.weight.uniform_(0.2, 3.0)
    model.save_pretrained(path)
    prompts = varied_prompts(4, seed=7, low=10, high=60)
    ours = loom_greedy(LLM(str(path), num_kv_blocks=256, block_size=8), prompts, 12)
    assert_parity(ours, hf_greedy(path, prompts, 12))


def _randomize_norms(path, seed: int = 0) -> None:
    """HF initialises norm weights to 1 (Gemma's to 0, meaning 1): make every norm matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 1.5)
    model.save_pretrained(path)


@pytest.mark.parametrize("arch,overrides", [
    ("mistral", {"sliding_window": 24, "head_dim": 16}),
    ("phi3", {"sliding_window": 20, "head_dim": 16}),
    # soft caps low enough to bend the scores and logits of a tiny model (Gemma 2's own are 50 and 30)
    ("gemma2", {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0}),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 16}),  # its NoPE layer windowed
], ids=["mistral-window", "phi3-window", "gemma2-softcap-alternating", "gemma3-qk-norm-dual-rope",
       "smollm3-nope-window"])  # fmt: skip
def test_sliding_windows_and_gemma_match_hf_past_the_window(tmp_path, smollm2_path, arch, overrides):
    """Windows of 16-24 tokens under prompts of up to 90 and 16 new tokens; 32-token steps chunk the prompts
    (a chunk then attends to cached keys partly outside the window); the last prompt hits the prefix cache."""
    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides)
    _randomize_norms(path)
    shared = varied_prompts(1, seed=5, low=40, high=40)[0]
    prompts = varied_prompts(5, seed=8, low=5, high=90) + [shared + [101], shared + [102, 103]]
    llm = LLM(str(path), num_kv_blocks=512, block_size=8, max_num_batched_tokens=32)
    assert_parity(loom_greedy(llm, prompts, 16), hf_greedy(path, prompts, 16))
    assert llm.engine.stats().prefix_hit_rate > 0
    torch_backend = LLM(str(path), num_kv_blocks=512, block_size=8, attention_backend="torch")
    assert [o[0] for o in loom_greedy(torch_backend, prompts[:3], 16)] == [o[0] for o in loom_greedy(llm, prompts[:3],
                                                                                                      16)]


@pytest.mark.slow
def test_smollm2_concurrent_matches_hf(smollm2_path):
    prompts = varied_prompts(16, seed=4, low=4, high=48)
    llm = LLM("smollm2:f32", max_num_batched_tokens=256, kv_cache_memory_gb=0.5)  # the float32 folder HF loads
    together = loom_greedy(llm, prompts, 16)
    assert_parity(together, hf_greedy(smollm2_path, prompts, 16))
    alone = [loom_greedy(llm, [p], 16)[0][0] for p in prompts[:4]]
    assert alone == [t[0] for t in together[:4]]


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path, smollm2_path):
    import json

    path = save_tiny_model(tmp_path / "falcon-like", smollm2_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="FalconForCausalLM is not supported; Loom serves Deepseek.*Gemma2.*Qwen3"):
        LLM(str(path), num_kv_blocks=64)


def test_a_bidirectional_gemma3_text_model_is_refused(tmp_path, smollm2_path):
    """EmbeddingGemma's config (Gemma3TextConfig with use_bidirectional_attention) describes an encoder: served as a
    causal model it would load and answer wrongly."""
    path = save_tiny_model(tmp_path / "embedding-gemma", smollm2_path, arch="gemma3", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention is an encoder"):
        LLM(str(path), num_kv_blocks=64)
