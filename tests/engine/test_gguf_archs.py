"""GGUF files of other architectures than llama, executed quantized: tiny random qwen2 (q/k/v biases), qwen3 (q/k
RMSNorm per head, a head_dim other than hidden / heads), phi3 (fused q/k/v and gate/up tensors, a sliding window) and
the qwen mixtures of experts, written with ``GGUFWriter`` in llama.cpp's tensor names, against transformers' own GGUF
loader, which expands the same file to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom import LLM, SamplingParams
from loom.ops.quantized import GGUFLinear
from tests.engine.test_parity import assert_parity, loom_greedy, teacher_forced_agreement

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, LAYERS = 128, 256, 4, 2, 1024, 2


PHI3_WINDOW = 48
"""The tiny phi3 file's sliding window: shorter than the longest test prompt."""

MOE = {"qwen3moe": {"experts": 4, "used": 2, "ff": 768, "shared": 0},  # transformers' defaults for the sizes
       "qwen2moe": {"experts": 4, "used": 2, "ff": 1408, "shared": 5632}}  # it does not read from the file
"""The tiny mixtures' shapes: transformers reads no expert_feed_forward_length (Qwen3MoeConfig's default 768,
Qwen2MoeConfig's 1408 and a 5632-wide shared expert), so the files use those."""


def write_tiny_gguf(path, arch: str) -> None:
    """A 2-layer random ``arch`` GGUF: Q8_0 embedding and q/k/v, Q4_1 o/gate/up, Q4_0 down, an F32 output head;
    qwen2(moe): F32 q/k/v biases; qwen3(moe): F32 q/k norms and head_dim 128 (hidden / heads would be 32); the
    mixtures: an F32 router, 3-D expert tensors (Q4_K gate/up, Q8_0 down for qwen3moe; Q4_1 gate/up, Q5_0 down for
    qwen2moe) and qwen2moe's shared expert (Q8_0) with its F32 gate."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    gemma = arch.startswith("gemma")
    # qwen3: transformers reads no key_length, so its default 128; gemma: 256, its query_pre_attn_scalar's default
    head_dim = 128 if arch.startswith("qwen3") else 256 if gemma else HIDDEN // HEADS
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    moe = MOE.get(arch)
    if arch == "gemma2":  # Gemma 2's soft caps (transformers' defaults are these too; Gemma 3 has none)
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    if gemma:  # gemma2: alternate layers windowed; gemma3: five of six
        writer.add_sliding_window(PHI3_WINDOW)
    if arch == "phi3":
        writer.add_sliding_window(PHI3_WINDOW)
        for add, token in ((writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_pad_token_id, 0)):
            add(token)  # Phi3Config's defaults (32000) lie outside the tiny vocabulary
    if moe:
        writer.add_expert_count(moe["experts"])
        writer.add_expert_used_count(moe["used"])
        writer.add_expert_feed_forward_length(moe["ff"])
        if moe["shared"]:
            writer.add_expert_shared_feed_forward_length(moe["shared"])
    rng = np.random.default_rng(0)

    def tensor(name: str, shape: tuple[int, ...], qtype=None, std: float = 0.08, mean: float = 0.0) -> None:
        data = (mean + std * rng.standard_normal(shape)).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    def kquant(name: str, shape: tuple[int, ...], qtype) -> None:  # random super-blocks (gguf quantizes no K-quant)
        from loom.ops.quantized import GGMLType
        from tests.engine.test_gguf_kquants import random_blocks

        rows = int(np.prod(shape[:-1]))
        data = random_blocks(GGMLType(int(qtype)), rows, shape[-1], seed=int(rng.integers(1 << 30)), std=0.08)
        writer.add_tensor(name, data.numpy().reshape(*shape[:-1], -1), raw_dtype=qtype)

    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    tensor("token_embd.weight", (VOCAB, HIDDEN), T.Q8_0, std=0.1 if gemma else 1.0)  # gemma scales it by sqrt(128)
    if not gemma:  # gemma ties its head to the embedding
        tensor("output.weight", (VOCAB, HIDDEN))
    tensor("output_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
        if gemma:  # norms after attention and around the MLP (weights stored plus one, as llama.cpp does)
            tensor(f"blk.{i}.post_attention_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
            tensor(f"blk.{i}.post_ffw_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
        if arch == "phi3":  # q, k and v rows in one tensor; gate and up rows in ffn_up
            tensor(f"blk.{i}.attn_qkv.weight", (q_rows + 2 * kv_rows, HIDDEN), T.Q8_0)
            tensor(f"blk.{i}.attn_output.weight", (HIDDEN, q_rows), T.Q4_1)
            tensor(f"blk.{i}.ffn_up.weight", (2 * INTERMEDIATE, HIDDEN), T.Q4_1)
            tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, INTERMEDIATE), T.Q4_0)
            continue
        tensor(f"blk.{i}.attn_q.weight", (q_rows, HIDDEN), T.Q8_0)
        tensor(f"blk.{i}.attn_k.weight", (kv_rows, HIDDEN), T.Q8_0)
        tensor(f"blk.{i}.attn_v.weight", (kv_rows, HIDDEN), T.Q8_0)
        if arch.startswith("qwen2"):
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                tensor(f"blk.{i}.attn_{name}.bias", (rows,), std=0.5)
        elif arch != "gemma2":
            tensor(f"blk.{i}.attn_q_norm.weight", (head_dim,), std=0.1, mean=1.0)
            tensor(f"blk.{i}.attn_k_norm.weight", (head_dim,), std=0.1, mean=1.0)
        tensor(f"blk.{i}.attn_output.weight", (HIDDEN, q_rows), T.Q4_1)
        if moe:
            e, ff = moe["experts"], moe["ff"]
            tensor(f"blk.{i}.ffn_gate_inp.weight", (e, HIDDEN), std=0.5)
            if arch == "qwen3moe":  # Q4_K: in_features 128 is not whole super-blocks; the down matrices' 768 is
                tensor(f"blk.{i}.ffn_gate_exps.weight", (e, ff, HIDDEN), T.Q4_1)
                tensor(f"blk.{i}.ffn_up_exps.weight", (e, ff, HIDDEN), T.Q4_1)
                kquant(f"blk.{i}.ffn_down_exps.weight", (e, HIDDEN, ff), T.Q4_K)
            else:
                tensor(f"blk.{i}.ffn_gate_exps.weight", (e, ff, HIDDEN), T.Q4_1)
                tensor(f"blk.{i}.ffn_up_exps.weight", (e, ff, HIDDEN), T.Q4_1)
                tensor(f"blk.{i}.ffn_down_exps.weight", (e, HIDDEN, ff), T.Q5_0)
                tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", (HIDDEN,), std=0.5)
                tensor(f"blk.{i}.ffn_gate_shexp.weight", (moe["shared"], HIDDEN), T.Q8_0, std=0.03)
                tensor(f"blk.{i}.ffn_up_shexp.weight", (moe["shared"], HIDDEN), T.Q8_0, std=0.03)
                tensor(f"blk.{i}.ffn_down_shexp.weight", (HIDDEN, moe["shared"]), T.Q8_0, std=0.03)
            continue
        tensor(f"blk.{i}.ffn_gate.weight", (INTERMEDIATE, HIDDEN), T.Q4_1)
        tensor(f"blk.{i}.ffn_up.weight", (INTERMEDIATE, HIDDEN), T.Q4_1)
        tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, INTERMEDIATE), T.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_a_qwen_or_phi3_gguf_runs_quantized_and_agrees_with_transformers_float32_expansion(arch, tmp_path,
                                                                                            smollm2_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.engine.test_gguf_kquants import hf_greedy

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    if arch == "phi3":  # transformers' GGUF loader does not read the window: the reference is told it here
        assert hf.config.sliding_window is None
        hf.config.sliding_window = PHI3_WINDOW
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 6, 19, 45, 80)]
    reference = hf_greedy(hf, prompts, max_new=8)
    assert len({ids[0] for ids, _ in reference}) > 1

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")  # exact to float rounding
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    attn = llm.engine.model.layers[1].self_attn
    head_dim = {"qwen3": 128, "gemma2": 256, "gemma3": 256}.get(arch, HIDDEN // HEADS)
    assert isinstance(attn.qkv_proj, GGUFLinear) and attn.head_dim == head_dim
    assert (attn.qkv_proj.bias is not None) == (arch == "qwen2")
    assert (attn.q_norm is not None) == (arch in ("qwen3", "gemma3"))
    assert attn.window == {"phi3": PHI3_WINDOW, "gemma3": PHI3_WINDOW}.get(arch)  # gemma2: layer 1 is global
    assert llm.engine.model.layers[0].self_attn.window == (PHI3_WINDOW if arch in ("phi3", "gemma2", "gemma3")
                                                           else None)
    hf_attn = hf.model.layers[1].self_attn
    hf_qkv = hf_attn.qkv_proj.weight if arch == "phi3" else torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight,
                                                                        hf_attn.v_proj.weight])
    assert torch.equal(attn.qkv_proj.dequantize(), hf_qkv)  # q/k kept in HF's order
    if arch == "phi3":
        mlp = llm.engine.model.layers[1].mlp
        assert torch.equal(mlp.gate_up_proj.dequantize(), hf.model.layers[1].mlp.gate_up_proj.weight)
    assert_parity(loom_greedy(llm, prompts, 8), reference)

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "int8")
    int8 = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    assert teacher_forced_agreement(int8, prompts, [ids for ids, _ in reference]) >= 0.9


def test_an_unsupported_gguf_architecture_is_refused_by_name(tmp_path, smollm2_path):
    from gguf import GGUFWriter

    path = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(path), "phi2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'phi2' is not supported yet; Loom executes GGUF files of "
                                         "llama, qwen2, qwen3"):
        LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=16)


def test_gemma3_rotary_scaling_and_gemma2_27b_query_scale_come_from_the_file():
    """What transformers' GGUF loader leaves out: Gemma 3's linear rotary scaling (4B and up; the global layers only,
    the sliding layers keep their own base) and Gemma 2 27B's query scale (llama.cpp's rule: hidden / heads)."""
    import tempfile
    from pathlib import Path

    from gguf import GGUFWriter

    from loom.models.gguf import load_gguf_config
    from loom.models.llama import LlamaConfig

    def config(arch: str, layers: int, factor: float | None):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{arch}.gguf"
            writer = GGUFWriter(str(path), arch)
            writer.add_context_length(1024)
            writer.add_embedding_length(HIDDEN)
            writer.add_block_count(layers)
            writer.add_feed_forward_length(INTERMEDIATE)
            writer.add_head_count(HEADS)
            writer.add_head_count_kv(KV_HEADS)
            writer.add_key_length(256)
            writer.add_value_length(256)
            writer.add_layer_norm_rms_eps(1e-6)
            writer.add_vocab_size(VOCAB)
            if factor:
                writer.add_rope_scaling_factor(factor)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return LlamaConfig.from_hf(load_gguf_config(path))

    scaled = config("gemma3", 2, 8.0)
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 8.0, "rope_theta": scaled.rope_theta}
    assert scaled.local_rope_theta == 10000.0 and config("gemma3", 2, None).rope_scaling is None
    assert config("gemma2", 46, None).query_pre_attn_scalar == HIDDEN // HEADS  # the 27B's 46 layers
    assert config("gemma2", 2, None).query_pre_attn_scalar == 256


def test_a_phi3_128k_file_runs_its_longrope_factors_as_transformers_runs_the_folder(tmp_path, smollm2_path,
                                                                                    monkeypatch):
    """Phi-3's 128k models scale the rotary embedding per frequency: llama.cpp's converter writes the factors as
    ``rope_factors_long`` / ``rope_factors_short`` tensors and the original context and attention factor as metadata.
    Against transformers with that LongRoPE put back by hand (its GGUF loader reads none of it), within the original
    context (see docs/models.md on where HF and Loom switch to the long factors). A file with the long factors only is
    refused with the reason."""
    from transformers import AutoModelForCausalLM
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from tests.engine.test_gguf_kquants import hf_greedy

    plain = tmp_path / "plain" / "phi3.gguf"
    plain.parent.mkdir()
    write_tiny_gguf(plain, "phi3")
    half = HIDDEN // HEADS // 2
    rng = np.random.default_rng(13)
    short, long = rng.uniform(1.0, 3.0, half).astype(np.float32), rng.uniform(2.0, 20.0, half).astype(np.float32)
    original, attention = 64, 1.19
    path = tmp_path / "phi3-128k.gguf"
    copy_gguf_with(plain, path, "phi3", {"rope_factors_long.weight": long, "rope_factors_short.weight": short},
                   {"phi3.rope.scaling.original_context_length": original, "phi3.rope.scaling.attn_factor": attention})
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf.config.sliding_window = PHI3_WINDOW  # transformers' GGUF loader does not read the window either
    hf.config.original_max_position_embeddings = original
    hf.config.rope_parameters = {"rope_theta": 1000000.0, "rope_type": "longrope", "short_factor": short.tolist(),
                                 "long_factor": long.tolist(), "attention_factor": attention,
                                 "original_max_position_embeddings": original}
    hf.model.rotary_emb = Phi3RotaryEmbedding(hf.config)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 23, 50)]  # 50 + 8 new < 64
    reference = hf_greedy(hf, prompts, max_new=8)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    assert llm.engine.model.config.rope_scaling["rope_type"] == "longrope"
    assert_parity(loom_greedy(llm, prompts, 8), reference)

    refused = tmp_path / "phi3-long-only.gguf"
    copy_gguf_with(plain, refused, "phi3", {"rope_factors_long.weight": long})
    with pytest.raises(ValueError, match="per-frequency rotary factors"):
        LLM(str(refused), tokenizer=str(smollm2_path), num_kv_blocks=16)


def copy_gguf_with(source, path, arch: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """``source`` (an ``arch`` file) rewritten to ``path`` with float32 ``tensors`` and ``metadata`` (key: value; a
    str, float or int value is written as a string, float32 or uint32) added."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith(f"{arch}.") or field.name.startswith("tokenizer."):
            writer.add_key_value(field.name, field.contents(), field.types[0])
    kinds = {str: GGUFValueType.STRING, float: GGUFValueType.FLOAT32, int: GGUFValueType.UINT32}
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, kinds[type(value)])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_rope_freqs(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as ``rope_freqs.weight`` for a Llama 3.1+ checkpoint (its
    llama3 rope scaling as one divisor per frequency; llama.cpp's rope divides each frequency by it)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_a_llama3_gguf_rotates_by_its_rope_freqs_as_transformers_llama3_scaling_does(tmp_path, smollm2_path,
                                                                                     monkeypatch):
    """Llama 3.1 / 3.2 files carry their rope scaling as a ``rope_freqs`` tensor, not in the metadata (transformers'
    GGUF loader ignores it, so its reference gets the llama3 scaling put back by hand): the same weights with that
    scaling give the same greedy tokens and logprobs; the file without the tensor (default rope) does not."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loom.ops.quantized import GGMLType
    from tests.engine.test_gguf_kquants import HEADS as KQ_HEADS
    from tests.engine.test_gguf_kquants import HIDDEN as KQ_HIDDEN
    from tests.engine.test_gguf_kquants import hf_greedy, write_tiny_kquant_gguf

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    plain = tmp_path / "plain" / "llama.gguf"
    plain.parent.mkdir()
    write_tiny_kquant_gguf(plain, {name: GGMLType.Q8_0 for name in ("embd", "output", "q", "k", "o", "gate", "up",
                                                                    "down")} | {"v": (GGMLType.Q8_0,) * 2})
    path = tmp_path / "llama-3.1.gguf"
    head_dim = KQ_HIDDEN // KQ_HEADS
    copy_gguf_with(plain, path, "llama", {"rope_freqs.weight": llama_cpp_rope_freqs(head_dim, 10000.0, llama3)})
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf.config.rope_parameters = {"rope_theta": 10000.0, **llama3}
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (7, 30, 90)]
    reference = hf_greedy(hf, prompts, max_new=8)

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")  # exact to float rounding
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    assert_parity(loom_greedy(llm, prompts, 8), reference)
    default_rope = loom_greedy(LLM(str(plain), tokenizer=str(smollm2_path), num_kv_blocks=256), prompts, 8)
    assert [ids for ids, _ in default_rope] != [ids for ids, _ in reference]  # the factors change the answer


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_a_mixture_of_experts_gguf_runs_quantized_and_agrees_with_transformers(arch, tmp_path, smollm2_path,
                                                                               monkeypatch):
    """qwen3moe (q/k norms, normalised top-2 of 4 experts, Q4_K down experts) and qwen2moe (biases, a shared expert
    behind a sigmoid gate, un-normalised top-2): each expert's matrices sliced from the 3-D tensors and kept
    quantized; with float32 activations transformers' greedy tokens and logprobs (its GGUF loader expands the same
    file), through a chunked prefill; with int8 activations >= 90% teacher-forced agreement."""
    from transformers import AutoModelForCausalLM

    from loom.models.llama import SparseMoE
    from tests.engine.test_gguf_kquants import hf_greedy

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 7, 26, 45)]
    reference = hf_greedy(hf, prompts, max_new=6)
    assert len({ids[0] for ids, _ in reference}) > 1

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256, max_num_batched_tokens=32)
    moe = llm.engine.model.layers[1].mlp
    assert isinstance(moe, SparseMoE) and len(moe.experts) == 4 and moe.norm_topk_prob == (arch == "qwen3moe")
    assert isinstance(moe.experts[3].gate_up_proj, GGUFLinear)
    hf_moe = hf.model.layers[1].mlp
    if arch == "qwen2moe":
        assert isinstance(moe.shared_expert.down_proj, GGUFLinear)
        assert torch.equal(moe.shared_expert.down_proj.dequantize(), hf_moe.shared_expert.down_proj.weight)
    assert_parity(loom_greedy(llm, prompts, 6), reference)

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "int8")  # 64 positions: a routing flip moves a whole token
    more = [rng.integers(3, VOCAB, n).tolist() for n in (12, 60, 3, 33)]
    forced = [ids for ids, _ in reference] + [ids for ids, _ in hf_greedy(hf, more, max_new=6)]
    int8 = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    # every expert matrix packed here, Q5_0 too (it has no float32-activation kernel: the run above expanded it)
    moe = int8.engine.model.layers[1].mlp
    assert all(isinstance(linear, GGUFLinear) for expert in moe.experts
               for linear in (expert.gate_up_proj, expert.down_proj))
    assert teacher_forced_agreement(int8, prompts + more, forced) >= 0.9


def test_a_gguf_file_is_parsed_once_per_version(tmp_path, smollm2_path, monkeypatch):
    """Loading a GGUF model reads its architecture, config and tensors from one parse of the file (plus
    transformers' own, for the config): a parse of SmolLM2's file takes ~2 s, and eight of them were most of
    `loom serve --model smollm2`'s start. The reader is let go once the weights are loaded (a big file's mapping
    would stay), the config is kept: a second engine on the same file parses it once; a rewritten file is read
    anew."""
    import gguf

    parses = []
    original = gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        parses.append(str(path))
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    path = tmp_path / "tiny-qwen2.gguf"
    write_tiny_gguf(path, "qwen2")
    first = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=64)
    assert len(parses) == 2  # Loom's one, transformers' one (AutoConfig)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = first.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids
    from loom.models import gguf as loom_gguf

    assert loom_gguf._reader.cache_info().currsize == 0
    second = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=64)
    assert len(parses) == 3
    assert second.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids == expected
    write_tiny_gguf(path, "qwen2")  # a new version of the file (same path)
    LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=64)
    assert len(parses) == 5


@pytest.mark.parametrize("scaling", [
    {"type": "yarn", "factor": 4.0, "original_context_length": 32},  # Qwen2.5's long context, as llama.cpp writes it
    {"type": "linear", "factor": 2.5},
], ids=["yarn", "linear"])  # fmt: skip
def test_rope_scaling_in_a_gguf_files_metadata_is_applied_as_transformers_applies_it_to_the_folder(
        scaling, tmp_path, smollm2_path, monkeypatch):
    """``{arch}.rope.scaling.*`` (transformers' GGUF loader reads none of it for these architectures, so its
    reference gets the scaling put back by hand): greedy tokens and logprobs over prompts past the original context;
    a kind Loom does not run is refused by name."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from tests.engine.test_gguf_kquants import hf_greedy

    plain = tmp_path / "plain" / "qwen2.gguf"
    plain.parent.mkdir()
    write_tiny_gguf(plain, "qwen2")
    path = tmp_path / "qwen2-scaled.gguf"
    copy_gguf_with(plain, path, "qwen2", {}, {f"qwen2.rope.scaling.{k}": v for k, v in scaling.items()})
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    kind = scaling["type"]
    hf.config.rope_parameters = {"rope_theta": 1000000.0, "rope_type": kind, "factor": scaling["factor"]}
    if kind == "yarn":
        hf.config.rope_parameters["original_max_position_embeddings"] = scaling["original_context_length"]
    hf.model.rotary_emb = Qwen2RotaryEmbedding(hf.config)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (9, 40, 80)]
    reference = hf_greedy(hf, prompts, max_new=8)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    assert_parity(loom_greedy(LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256), prompts, 8), reference)

    refused = tmp_path / "qwen2-dynamic.gguf"
    copy_gguf_with(plain, refused, "qwen2", {}, {"qwen2.rope.scaling.type": "dynamic"})
    with pytest.raises(ValueError, match="'dynamic'.*linear and yarn only"):
        LLM(str(refused), tokenizer=str(smollm2_path), num_kv_blocks=16)
    # llama.cpp multiplies yarn's attention factor by this one; transformers' attention_factor replaces it
    copy_gguf_with(plain, refused, "qwen2", {}, {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                                                 "qwen2.rope.scaling.original_context_length": 32,
                                                 "qwen2.rope.scaling.attn_factor": 1.2})
    with pytest.raises(ValueError, match="attn_factor"):
        LLM(str(refused), tokenizer=str(smollm2_path), num_kv_blocks=16)


def test_a_phi4_mini_shaped_gguf_with_partial_rotary_agrees_with_transformers(tmp_path, smollm2_path, monkeypatch):
    """``phi3.rope.dimension_count`` below the head size (Phi-4-mini: 96 of 128): the quantized q/k rows of each head
    are reordered as they are read, so the full-width kernels rotate only those dimensions; against transformers with
    the partial rotary put back (its GGUF loader does not read the count)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from tests.engine.test_gguf_kquants import hf_greedy

    plain = tmp_path / "plain" / "phi3.gguf"
    plain.parent.mkdir()
    write_tiny_gguf(plain, "phi3")
    head_dim = HIDDEN // HEADS
    path = tmp_path / "phi4-mini-shaped.gguf"
    copy_gguf_with(plain, path, "phi3", {}, {"phi3.rope.dimension_count": head_dim * 3 // 4})
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf.config.sliding_window = PHI3_WINDOW
    hf.config.partial_rotary_factor = hf.config.rope_parameters["partial_rotary_factor"] = 0.75
    hf.model.rotary_emb = Phi3RotaryEmbedding(hf.config)
    assert hf.model.rotary_emb.inv_freq.numel() == head_dim * 3 // 8
    rng = np.random.default_rng(14)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (4, 30, 70)]
    reference = hf_greedy(hf, prompts, max_new=8)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    assert llm.engine.model.config.rotary_dim == head_dim * 3 // 4
    assert_parity(loom_greedy(llm, prompts, 8), reference)
