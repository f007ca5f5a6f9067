"""GGUF files of other architectures than llama, executed quantized: tiny random qwen2 (q/k/v biases) and qwen3 (q/k
RMSNorm per head, a head_dim other than hidden / heads) files written with ``GGUFWriter`` in llama.cpp's tensor
names, against transformers' own GGUF loader, which expands the same file to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom import LLM
from loom.ops.quantized import GGUFLinear
from tests.engine.test_parity import assert_parity, loom_greedy, teacher_forced_agreement

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, LAYERS = 128, 256, 4, 2, 1024, 2


def write_tiny_gguf(path, arch: str) -> None:
    """A 2-layer random ``arch`` GGUF: Q8_0 embedding and q/k/v, Q4_1 o/gate/up, Q4_0 down, an F32 output head;
    qwen2: F32 q/k/v biases; qwen3: F32 q/k norms and head_dim 128 (hidden / heads would be 32)."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    head_dim = 128 if arch == "qwen3" else HIDDEN // HEADS  # transformers reads no key_length: Qwen3Config's 128
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
    rng = np.random.default_rng(0)

    def tensor(name: str, shape: tuple[int, ...], qtype=None, std: float = 0.08, mean: float = 0.0) -> None:
        data = (mean + std * rng.standard_normal(shape)).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    tensor("token_embd.weight", (VOCAB, HIDDEN), T.Q8_0, std=1.0)
    tensor("output.weight", (VOCAB, HIDDEN))
    tensor("output_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,), std=0.1, mean=1.0)
        tensor(f"blk.{i}.attn_q.weight", (q_rows, HIDDEN), T.Q8_0)
        tensor(f"blk.{i}.attn_k.weight", (kv_rows, HIDDEN), T.Q8_0)
        tensor(f"blk.{i}.attn_v.weight", (kv_rows, HIDDEN), T.Q8_0)
        if arch == "qwen2":
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                tensor(f"blk.{i}.attn_{name}.bias", (rows,), std=0.5)
        else:
            tensor(f"blk.{i}.attn_q_norm.weight", (head_dim,), std=0.1, mean=1.0)
            tensor(f"blk.{i}.attn_k_norm.weight", (head_dim,), std=0.1, mean=1.0)
        tensor(f"blk.{i}.attn_output.weight", (HIDDEN, q_rows), T.Q4_1)
        tensor(f"blk.{i}.ffn_gate.weight", (INTERMEDIATE, HIDDEN), T.Q4_1)
        tensor(f"blk.{i}.ffn_up.weight", (INTERMEDIATE, HIDDEN), T.Q4_1)
        tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, INTERMEDIATE), T.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_qwen_gguf_runs_quantized_and_agrees_with_transformers_float32_expansion(arch, tmp_path, smollm2_path,
                                                                                    monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.engine.test_gguf_kquants import hf_greedy

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 6, 19, 45, 80)]
    reference = hf_greedy(hf, prompts, max_new=8)
    assert len({ids[0] for ids, _ in reference}) > 1

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")  # exact to float rounding
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    attn = llm.engine.model.layers[1].self_attn
    assert isinstance(attn.qkv_proj, GGUFLinear) and attn.head_dim == (128 if arch == "qwen3" else HIDDEN // HEADS)
    assert (attn.qkv_proj.bias is not None) == (arch == "qwen2") and (attn.q_norm is not None) == (arch == "qwen3")
    hf_attn = hf.model.layers[1].self_attn
    assert torch.equal(attn.qkv_proj.dequantize(), torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight,
                                                              hf_attn.v_proj.weight]))  # q/k kept in HF's order
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
