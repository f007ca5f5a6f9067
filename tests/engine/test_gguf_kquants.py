"""GGUF K-quants (Q4_K, Q6_K) executed quantized: the float32-activation kernels on random super-blocks against the
gguf package's dequantizer (then a float32 matmul), on the AVX-512 path and the portable one; and a tiny random llama
GGUF file of Q4_K / Q6_K projections against transformers' own GGUF loader, which expands the same file to float32:
with float32 activations equal to float rounding, with int8 ones (the default) the same greedy tokens on most
positions. The int8 kernels themselves: test_gguf_int8.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom import LLM, SamplingParams
from loom.ops.cpp_extension import gguf_extension
from loom.ops.quantized import (
    BLOCK_BYTES,
    BLOCK_WEIGHTS,
    DEQUANTIZE_ROWS,
    GGMLType,
    GGUFLinear,
    StackedGGUFLinear,
    dequantize_reference,
)
from tests.engine.test_parity import assert_parity, loom_greedy, teacher_forced_agreement

K_QUANTS = [GGMLType.Q4_K, GGMLType.Q6_K]


def random_blocks(qtype: GGMLType, rows: int, k: int, seed: int = 0, std: float = 0.05) -> torch.Tensor:
    """[rows, k / block weights * block bytes] uint8: random bytes for every quant and scale, with finite fp16 d (and
    dmin) drawn so the weights have about ``std`` (Q4_K's dmin near 7.5 d centres its unsigned nibbles)."""
    rng = np.random.default_rng(seed)
    nb = k // BLOCK_WEIGHTS[qtype]
    raw = rng.integers(0, 256, (rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)

    def fp16(scale: float) -> np.ndarray:  # [rows, nb, 2]: the bytes of fp16 values around scale
        return (scale * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)

    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K):  # w = d sc q - dmin m; sc, m in [0, 63], q in [0, 15] / [0, 31]
        d = std / (145 if qtype == GGMLType.Q4_K else 290)
        raw[..., 0:2], raw[..., 2:4] = fp16(d), fp16((7.5 if qtype == GGMLType.Q4_K else 15.5) * d)
    elif qtype == GGMLType.Q6_K:  # w = d scale (q - 32); scale int8, q - 32 in [-32, 31]
        raw[..., 208:210] = fp16(std / 1350)
    elif qtype == GGMLType.Q3_K:  # w = d (sc - 32) (q - 4); q in [0, 7]
        raw[..., 108:110] = fp16(std / 40)
    elif qtype == GGMLType.Q2_K:  # w = d sc q - dmin m; sc, m in [0, 15], q in [0, 3]
        raw[..., 80:82], raw[..., 82:84] = fp16(std / 15), fp16(std / 10)
    elif qtype == GGMLType.IQ4_NL:  # w = d level; levels in [-127, 113]
        raw[..., 0:2] = fp16(std / 70)
    elif qtype == GGMLType.IQ4_XS:  # w = d (ls - 32) level; ls in [0, 63]
        raw[..., 0:2] = fp16(std / 1300)
    else:
        raise ValueError(f"random super-blocks of {qtype.name}?")
    return torch.from_numpy(raw.reshape(rows, -1))


def linear(layer: GGUFLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    """The layer's forward (AVX-512 where compiled in), or the extension's portable C++ loops on the same blocks."""
    if path == "default":
        return layer(x)
    return gguf_extension().gguf_linear(x, layer.qweight, int(layer.qtype), layer.bias, portable=True)


@pytest.mark.parametrize("portable", [False, True], ids=["default", "portable"])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_kquant_dequantize_equals_the_gguf_reference(qtype, portable):
    qweight = random_blocks(qtype, rows=37, k=768)  # 3 super-blocks a row; rows not a multiple of 16
    ours = gguf_extension().gguf_dequantize(qweight, int(qtype), 768, portable=portable)
    assert torch.equal(ours, dequantize_reference(qweight, qtype, 768))


@pytest.mark.parametrize("path", ["default", "portable"])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, DEQUANTIZE_ROWS + 3])  # tile tails; the last: the dequantize + GEMM
def test_kquant_kernel_equals_the_reference_matmul(qtype, path, rows):
    qweight = random_blocks(qtype, rows=37, k=768, seed=rows)
    layer = GGUFLinear(qweight, qtype, 768, bias=torch.randn(37), activations="float32")
    reference = dequantize_reference(qweight, qtype, 768)
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    expected = x @ reference.T + layer.bias
    assert expected.abs().max() > 1  # outputs of a size where the tolerance below means something
    torch.testing.assert_close(linear(layer, x, path), expected, atol=1e-4, rtol=1e-5)


def test_a_kquant_layer_needs_whole_super_blocks():
    with pytest.raises(ValueError, match="in_features must be a multiple of 256 for Q4_K blocks, got 288"):
        GGUFLinear(random_blocks(GGMLType.Q4_K, rows=4, k=256), GGMLType.Q4_K, 288)
    with pytest.raises(ValueError, match=r"Q6_K weight for 512 inputs must be \[out, 420\] uint8"):
        GGUFLinear(random_blocks(GGMLType.Q6_K, rows=4, k=256), GGMLType.Q6_K, 512)


HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 1024


Q4_K_M = {"embd": GGMLType.Q4_K, "output": GGMLType.Q6_K, "q": GGMLType.Q4_K, "k": GGMLType.Q4_K,
          "v": (GGMLType.Q4_K, GGMLType.Q6_K), "o": GGMLType.Q6_K, "gate": GGMLType.Q4_K, "up": GGMLType.Q4_K,
          "down": GGMLType.Q6_K}
"""The tensor types of a Q4_K_M-shaped file (v: per layer)."""


def write_tiny_kquant_gguf(path, types: dict = Q4_K_M) -> None:
    """A 2-layer random llama GGUF of the given tensor ``types``, by default shaped like a Q4_K_M file: Q4_K
    q/k/gate/up and embedding, Q6_K o/down and output; v is Q4_K in layer 0 and Q6_K in layer 1 (a fused q/k/v of
    two types)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(2)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    seed = iter(range(1000))

    def quantized(name: str, qtype: GGMLType, rows: int, k: int, std: float = 0.05) -> None:
        if BLOCK_WEIGHTS[qtype] == 32 and qtype != GGMLType.IQ4_NL:  # gguf's own quantizer for these 32-weight types
            from gguf.quants import quantize

            w = np.random.default_rng(next(seed)).standard_normal((rows, k)).astype(np.float32) * std
            writer.add_tensor(name, quantize(w, GGMLQuantizationType(int(qtype))),
                              raw_dtype=GGMLQuantizationType(int(qtype)))
            return
        writer.add_tensor(name, random_blocks(qtype, rows, k, next(seed), std).numpy(),
                          raw_dtype=GGMLQuantizationType(int(qtype)))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.random.default_rng(next(seed)).uniform(0.8, 1.2, HIDDEN).astype(np.float32))

    kv = KV_HEADS * HIDDEN // HEADS
    quantized("token_embd.weight", types["embd"], VOCAB, HIDDEN, std=1.0)
    quantized("output.weight", types["output"], VOCAB, HIDDEN)
    norm("output_norm.weight")
    for i, v_type in enumerate(types["v"]):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        quantized(f"blk.{i}.attn_q.weight", types["q"], HIDDEN, HIDDEN)
        quantized(f"blk.{i}.attn_k.weight", types["k"], kv, HIDDEN)
        quantized(f"blk.{i}.attn_v.weight", v_type, kv, HIDDEN)
        quantized(f"blk.{i}.attn_output.weight", types["o"], HIDDEN, HIDDEN)
        quantized(f"blk.{i}.ffn_gate.weight", types["gate"], INTERMEDIATE, HIDDEN)
        quantized(f"blk.{i}.ffn_up.weight", types["up"], INTERMEDIATE, HIDDEN)
        quantized(f"blk.{i}.ffn_down.weight", types["down"], HIDDEN, INTERMEDIATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_greedy(model, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """Greedy ids and the chosen tokens' float32 logprobs of an HF causal LM."""
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=2)
            new = out.sequences[0, len(ids):].tolist()
            results.append((new, [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, new)]))
    return results


def test_a_kquant_gguf_file_runs_quantized_and_agrees_with_transformers_float32_expansion(tmp_path, smollm2_path,
                                                                                         monkeypatch):
    path = tmp_path / "tiny-q4_k_m.gguf"
    write_tiny_kquant_gguf(path)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")  # exact to float rounding; int8 below
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    model = llm.engine.model
    first, second = model.layers
    assert isinstance(first.self_attn.qkv_proj, GGUFLinear) and first.self_attn.qkv_proj.qtype == GGMLType.Q4_K
    assert isinstance(second.self_attn.qkv_proj, StackedGGUFLinear)
    assert [p.qtype for p in second.self_attn.qkv_proj.parts] == [GGMLType.Q4_K, GGMLType.Q6_K]
    assert first.self_attn.o_proj.qtype == GGMLType.Q6_K and first.mlp.gate_up_proj.qtype == GGMLType.Q4_K
    assert first.mlp.down_proj.qtype == GGMLType.Q6_K and model.logits_proj.qtype == GGMLType.Q6_K

    from transformers import AutoModelForCausalLM

    # transformers' own GGUF loader: the file expanded by the gguf package's dequantizer, q/k un-permuted its own way
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    hf_attn = hf.model.layers[1].self_attn
    hf_qkv = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight])
    assert torch.equal(second.self_attn.qkv_proj.dequantize(), hf_qkv)

    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 5, 17, 40, 90)]  # the last two: the GEMM path
    reference = hf_greedy(hf, prompts, max_new=8)
    assert len({ids[0] for ids, _ in reference}) > 1  # the random model does not answer every prompt alike
    assert_parity(loom_greedy(llm, prompts, 8), reference)

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "int8")  # activations quantized per 32: llama.cpp's arithmetic
    int8 = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    assert int8.engine.model.layers[0].mlp.gate_up_proj.activations == "int8"
    assert teacher_forced_agreement(int8, prompts, [ids for ids, _ in reference]) >= 0.9
    for (_, ours_lp), (_, ref_lp) in zip(loom_greedy(int8, prompts, 8), reference):  # the first token's logprob
        assert abs(ours_lp[0] - ref_lp[0]) < 0.05


MIXED = {"embd": GGMLType.Q5_0, "output": GGMLType.Q5_1, "q": GGMLType.Q5_K, "k": GGMLType.Q5_K,
         "v": (GGMLType.Q3_K, GGMLType.Q5_K), "o": GGMLType.Q2_K, "gate": GGMLType.Q3_K, "up": GGMLType.Q3_K,
         "down": GGMLType.Q5_K}
"""Q5_K_M's main type, the 2- and 3-bit K-quants and the 5-bit legacy types, in one file."""

IQ4 = {"embd": GGMLType.IQ4_NL, "output": GGMLType.IQ4_XS, "q": GGMLType.IQ4_XS, "k": GGMLType.IQ4_XS,
       "v": (GGMLType.IQ4_NL, GGMLType.IQ4_XS), "o": GGMLType.IQ4_NL, "gate": GGMLType.IQ4_NL, "up": GGMLType.IQ4_NL,
       "down": GGMLType.IQ4_XS}
"""The non-linear 4-bit types (levels looked up from the nibbles) in one file, IQ4_XS_M-like."""


@pytest.mark.parametrize("types", [MIXED, IQ4], ids=["q5-q3-q2", "iq4"])
def test_types_without_float_kernels_run_packed_and_agree_with_transformers(tmp_path, smollm2_path, types):
    """Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL and IQ4_XS projections (no float32-activation kernel: spelled out by
    ``block_quants``, packed into the int8 tiles) run quantized: their weights equal transformers' expansion of the
    file exactly, and the next token agrees on >= 90% of teacher-forced positions; with the triton backend
    (weight-only, float activations) greedy tokens and logprobs equal transformers' to float32 rounding."""
    from transformers import AutoModelForCausalLM

    from loom.ops.triton.quantized import TritonQuantLinear

    path = tmp_path / "tiny-mixed.gguf"
    write_tiny_kquant_gguf(path, types)
    llm = LLM(str(path), tokenizer=str(smollm2_path), num_kv_blocks=256)
    first, second = llm.engine.model.layers
    assert [p.qtype for p in first.self_attn.qkv_proj.parts] == [types["q"], types["v"][0]]
    assert second.self_attn.qkv_proj.qtype == types["q"] and first.self_attn.o_proj.qtype == types["o"]
    assert first.mlp.gate_up_proj.qtype == types["gate"] and llm.engine.model.logits_proj.qtype == types["output"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    hf_attn, hf_mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    assert torch.equal(first.self_attn.qkv_proj.dequantize(),
                       torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))
    assert torch.equal(first.self_attn.o_proj.dequantize(), hf_attn.o_proj.weight)
    assert torch.equal(first.mlp.down_proj.dequantize(), hf_mlp.down_proj.weight)
    assert torch.equal(llm.engine.model.logits_proj.dequantize(), hf.lm_head.weight)

    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (1, 5, 17, 40)]
    reference = hf_greedy(hf, prompts, max_new=6)
    assert len({ids[0] for ids, _ in reference}) > 1
    assert teacher_forced_agreement(llm, prompts, [ids for ids, _ in reference]) >= 0.9

    triton = LLM(str(path), tokenizer=str(smollm2_path), attention_backend="triton", num_kv_blocks=64)
    assert isinstance(triton.engine.model.layers[0].self_attn.o_proj, TritonQuantLinear)
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4, logprobs=1)  # as hf_greedy: no EOS
    outs = triton.generate([{"prompt_token_ids": p} for p in prompts[:3]], params)
    ours = [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]
    assert_parity(ours, [(ids[:4], lps[:4]) for ids, lps in reference[:3]])
