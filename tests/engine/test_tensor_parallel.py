"""Tensor parallelism: 2 ranks (2 processes x 1 thread, gloo, float32) against 1, step by step.

The sharding arithmetic is checked directly; the parity tests run the same requests through an engine with
tensor_parallel_size=2 and one with 1 and compare every step's logits (torch.testing.assert_close at 1e-5 absolute and
relative: the all-reduce adds the ranks' partial sums in another order) and the greedy ids. The tiny models are
shaped to split unevenly (3 KV heads, an odd MLP width and vocabulary), as SmolLM2 (3 KV heads) does over 2 ranks.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from loom.distributed import shm
from loom.distributed.parallel import head_shard, split_evenly
from loom.distributed.shm import SharedMemoryGroup
from loom.engine.config import EngineConfig
from loom.engine.llm_engine import LLMEngine
from loom.engine.model_runner import StepInputs
from loom.engine.sampling_params import SamplingParams
from loom.engine.tensor_parallel import EngineFatalError
from loom.models.llama import LlamaConfig
from tests.conftest import save_tiny_model

UNEVEN = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=130, vocab_size=49153)


def test_split_evenly_gives_contiguous_runs_that_differ_by_at_most_one():
    for total in range(1, 12):
        for parts in range(1, total + 1):
            runs = [split_evenly(total, parts, i) for i in range(parts)]
            assert runs[0][0] == 0 and runs[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
            sizes = [end - start for start, end in runs]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def _config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=100, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False,
                architecture="LlamaForCausalLM")
    return LlamaConfig(**{**base, **overrides})


def test_smollm2_shape_splits_by_kv_head_groups():
    cfg = _config()  # SmolLM2-135M: 9 query heads over 3 KV heads
    first, second = head_shard(cfg, 0, 2), head_shard(cfg, 1, 2)
    assert (first.kv_heads, first.q_heads, first.intermediate) == ((0, 2), (0, 6), (0, 768))
    assert (second.kv_heads, second.q_heads, second.intermediate) == ((2, 3), (6, 9), (768, 1536))
    with pytest.raises(ValueError, match="at most 3"):
        head_shard(cfg, 0, 4)


def test_step_inputs_survive_the_trip_to_the_other_ranks():
    inputs = StepInputs(input_ids=[5, 6, 7, 8, 9], positions=[3, 7, 0, 1, 2], slots=[3, 23, 32, 33, 34],
                        decode_tables=[[0, 0], [1, 2]], decode_seq_lens=[4, 8],
                        prefills=[(2, 4, 0, None), (4, 5, 16, [5, 6])], logit_rows=[0, 1, 4])
    assert StepInputs.decode(inputs.encode()) == inputs
    empty = StepInputs([1], [0], [0], [], [], [(0, 1, 0, None)], [])
    assert StepInputs.decode(empty.encode()) == empty


def _with_random_biases(path):
    """HF initialises biases to zero, where a bias added on every rank instead of once would go unseen."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(file)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith(".bias"):
            weights[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(weights, file, metadata={"format": "pt"})
    return path


def test_shared_memory_all_reduce_and_gather_between_two_ranks(tmp_path):
    path = shm.create_file(2, 4096)
    groups = [SharedMemoryGroup(path, rank, 2, 4096, timeout_s=10) for rank in range(2)]
    os.unlink(path)
    xs = [torch.randn(7, 33, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    results = [[], []]

    def rank_main(rank):
        for i in range(5):  # several generations: both buffer sets in turn
            x = xs[rank] * (i + 1)
            results[rank].append((groups[rank].all_reduce(x.clone()), groups[rank].gather(x)))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(5):
        (sum0, parts), (sum1, none) = results[0][i], results[1][i]
        assert torch.equal(sum0, sum1)  # bit-identical on every rank
        torch.testing.assert_close(sum0, (xs[0] + xs[1]) * (i + 1))
        assert none is None and all(torch.equal(p, x * (i + 1)) for p, x in zip(parts, xs))
    assert not groups[0].fits(torch.zeros(2048))  # 8 KiB > the 4 KiB slot: the process group takes it
    lonely_path = shm.create_file(2, 64)
    lonely = SharedMemoryGroup(lonely_path, 0, 2, 64, timeout_s=0.2)
    os.unlink(lonely_path)
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not reach"):
        lonely.all_reduce(torch.ones(4))


def _run(path, tp: int, prompts, after_add=None, **engine):
    eng = LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=tp, num_kv_blocks=64, seed=0, **engine))
    steps: list[torch.Tensor] = []
    execute = eng.runner.execute

    def recording(out, in_flight=None):
        logits, sampling = execute(out, in_flight)
        steps.append(logits.clone())
        return logits, sampling

    eng.runner.execute = recording
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    try:
        outputs = {}
        for wave in prompts:  # waves: the second finds the first's prefix in the cache
            for i, item in enumerate(wave):  # token ids, or (token ids, LoRA adapter)
                ids, adapter = item if isinstance(item, tuple) else (item, None)
                eng.add_request(f"{len(outputs)}-{i}", prompt_token_ids=ids, params=params, lora_request=adapter)
            if after_add is not None:
                after_add()
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished:
                        outputs[out.request_id] = (out.outputs[0].token_ids, out.num_cached_tokens)
        return steps, outputs
    finally:
        eng.shutdown()


def _assert_same_run(path, prompts, before_run=None, **engine):
    if before_run is not None:
        before_run()
    one_steps, one = _run(path, 1, prompts, **engine)
    if before_run is not None:
        before_run()
    two_steps, two = _run(path, 2, prompts, **engine)
    assert len(one_steps) == len(two_steps)
    for a, b in zip(one_steps, two_steps):  # the ranks' partial sums add in another order: 1.2e-5 seen (Phi-3)
        torch.testing.assert_close(b, a, atol=3e-5, rtol=1e-5)
    assert two == one
    return one


@pytest.mark.slow
@pytest.mark.parametrize("arch, overrides", [
    ("llama", dict(UNEVEN, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),  # o_proj/down biases
    ("phi3", dict(UNEVEN, pad_token_id=0, sliding_window=None)),  # fused qkv and gate_up checkpoint tensors
    ("granite", dict(UNEVEN, attention_bias=True, mlp_bias=True)),  # the residual multiplier folded into shards
    ("smollm3", UNEVEN),  # a NoPE layer
    ("phi3", dict(UNEVEN, pad_token_id=0, sliding_window=None, partial_rotary_factor=0.75)),  # q/k rows reordered
    # every expert (and the shared one) cut by columns, odd widths; the dense layer too (mlp_only_layers)
    ("qwen2_moe", dict(UNEVEN, moe_intermediate_size=66, shared_expert_intermediate_size=90, mlp_only_layers=[1])),
    ("gpt_oss", dict(UNEVEN, intermediate_size=66)),  # sinks by heads, interleaved experts cut, their biases once
    ("glm4_moe", dict(UNEVEN, moe_intermediate_size=66)),  # half-rotary heads, an ungated shared expert, groups
    ("granite_moe", dict(UNEVEN, intermediate_size=66)),  # the residual multiplier in every expert's shards
    # latent attention: heads' query, key / value and output parts cut, the latent replicated (V3: a query bottleneck)
    ("deepseek_v2", dict(UNEVEN, num_key_value_heads=6, moe_intermediate_size=66)),
    ("deepseek_v3", dict(UNEVEN, num_key_value_heads=6, moe_intermediate_size=66)),
])  # fmt: skip
def test_two_ranks_match_one_through_prefill_decode_chunks_and_prefix_hits(tmp_path, smollm2_path, arch, overrides,
                                                                          monkeypatch):
    """All-reduces through shared memory (``loom.distributed.shm``; Phi-3) and through gloo (Llama)."""
    if arch == "llama":
        monkeypatch.setenv("LOOM_TP_SHARED_MEMORY", "0")
    path = _with_random_biases(save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides))
    shared = list(range(100, 140))
    prompts = [[shared + [7, 8], list(range(300, 323))], [shared + [9]]]
    # max_num_batched_tokens 16: the 42-token prompt runs as three chunks beside the other's decodes
    outputs = _assert_same_run(path, prompts, max_num_batched_tokens=16)
    assert outputs["2-0"][1] == 32  # the second wave's prompt found two blocks of the first in the cache


@pytest.mark.slow
def test_smollm2_greedy_ids_are_identical_over_two_ranks(smollm2_path):
    from loom.models.loader import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a quiet village,"]
    one_steps, one = _run(smollm2_path, 1, [[tok.encode(t) for t in texts]])
    two_steps, two = _run(smollm2_path, 2, [[tok.encode(t) for t in texts]])
    assert two == one
    for a, b in zip(one_steps, two_steps):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # 30 layers of reordered sums


@pytest.mark.slow
def test_an_adapter_on_latent_attention_splits_over_two_ranks(tmp_path, smollm2_path):
    """DeepSeek's o_proj reads its heads' values (v_head_dim wide, not the query heads' width): a rank's part of an
    adapter on it is A's columns of the rank's heads' values; a dense layer's down_proj beside it."""
    from loom.engine.lora import LoRARequest
    from tests.engine.test_lora import make_adapter

    path = save_tiny_model(tmp_path / "m", smollm2_path, arch="deepseek_v2",
                           **dict(UNEVEN, num_key_value_heads=6, moe_intermediate_size=66))
    make_adapter(tmp_path / "a", path, seed=1, r=4, alpha=8, targets=["o_proj", "0.mlp.down_proj"])
    adapter = LoRARequest("a", 1, str(tmp_path / "a"))
    _assert_same_run(path, [[(list(range(100, 130)), adapter), list(range(200, 220))]], enable_lora=True,
                     max_lora_rank=4)


@pytest.mark.slow
def test_lora_adapters_split_over_two_ranks_run_as_on_one(tmp_path, smollm2_path):
    """Each rank holds its part of every adapter (B's columns of q/k/v and gate/up, A's input columns of o and down).
    Three adapters and the base in one decode batch (the dense path), then a fourth adapter in a full set of slots:
    rank 0 swaps one out and sends the other rank the new one before the step. The folders are moved away once the
    requests are in: every rank runs the weights rank 0 read (no rank reads a folder again)."""
    from loom.engine.lora import LoRARequest
    from tests.engine.test_lora import TARGETS_ALL, make_adapter

    path = _with_random_biases(save_tiny_model(tmp_path / "m", smollm2_path, **UNEVEN))
    specs = [(8, 16, TARGETS_ALL), (4, 8, ["q_proj", "v_proj", "down_proj"]), (2, 4, ["gate_proj", "o_proj"]),
             (4, 4, ["k_proj", "up_proj"])]
    adapters = []
    for i, (r, alpha, targets) in enumerate(specs):
        make_adapter(tmp_path / f"a{i}", path, seed=i, r=r, alpha=alpha, targets=targets)
        adapters.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    shared = list(range(100, 140))
    prompts = [[(shared + [7, 8], adapters[0]), (list(range(300, 323)), adapters[1]), (shared + [5], adapters[2]),
                shared + [6]],
               [(shared + [9], adapters[3]), (shared + [7, 8, 10], adapters[0])]]
    def hide():
        for adapter in adapters:
            os.rename(adapter.lora_path, adapter.lora_path + ".away")

    def restore():
        for adapter in adapters:
            if os.path.exists(adapter.lora_path + ".away"):
                os.rename(adapter.lora_path + ".away", adapter.lora_path)

    waves = []

    def after_add():  # each run has two waves: once the second's requests are in, every adapter has been read
        waves.append(None)
        if len(waves) % 2 == 0:
            hide()

    outputs = _assert_same_run(path, prompts, before_run=restore, after_add=after_add, enable_lora=True,
                               max_loras=3, max_lora_rank=8, max_num_batched_tokens=64)
    restore()
    assert outputs["4-1"][1] == 32  # adapter 0's prefix from the first wave (an adapter's blocks are its own)
    assert len({tuple(ids) for ids, _ in outputs.values()}) > 1


def test_a_rank_that_dies_stops_the_engine_with_its_exit_code(tmp_path, smollm2_path):
    path = save_tiny_model(tmp_path / "m", smollm2_path, **UNEVEN)
    eng = LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=2, num_kv_blocks=16))
    failures = []
    eng.workers.on_failure = failures.append
    try:
        eng.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=4))
        eng.step()
        rank1 = eng.workers.processes[0]
        os.kill(rank1.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not failures and time.monotonic() < deadline:  # the watcher sees it while the engine idles
            time.sleep(0.05)
        assert failures and "rank 1" in failures[0] and "code -9" in failures[0]
        with pytest.raises(EngineFatalError, match="rank 1 .* exited with code -9"):
            eng.step()
    finally:
        eng.shutdown()


def test_tensor_parallel_refuses_what_it_cannot_split(tmp_path, smollm2_path):
    path = save_tiny_model(tmp_path / "m", smollm2_path, **UNEVEN)
    with pytest.raises(ValueError, match="at most 3"):
        LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=4, num_kv_blocks=16))
    olmo2 = save_tiny_model(tmp_path / "olmo2", smollm2_path, arch="olmo2", **UNEVEN)
    with pytest.raises(ValueError, match="OLMo 2's and OLMoE's q/k norms span every head"):
        LLMEngine(EngineConfig(model=str(olmo2), tensor_parallel_size=2, num_kv_blocks=16))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen2moe"])
def test_a_gguf_file_splits_over_two_ranks_and_runs_as_on_one(tmp_path, smollm2_path, arch, monkeypatch):
    """Quantized rows split as stored: q/k/v and gate/up by rows (phi3's fused tensors cut first), o and down by
    whole blocks of input columns, qwen2's q/k/v biases with their rows, the vocabulary (a quantized or float head) by
    rows padded with zero blocks, each expert's gate/up rows and down columns (qwen2moe, with its shared expert). A
    llama file of five 32-weight types (IQ4_NL among them), a qwen2 file (F32 head), a phi3 file and a qwen2moe
    file; float32 activations, and int8 ones for the llama file (per-32 activation blocks fall the same way when the
    split is block-aligned)."""
    from loom.ops.quantized import GGMLType
    from tests.engine.test_gguf_archs import write_tiny_gguf
    from tests.engine.test_gguf_kquants import write_tiny_kquant_gguf

    path = tmp_path / f"tiny-{arch}.gguf"
    if arch == "llama":
        write_tiny_kquant_gguf(path, {"embd": GGMLType.Q8_0, "output": GGMLType.Q4_1, "q": GGMLType.Q4_0,
                                      "k": GGMLType.Q4_0, "v": (GGMLType.Q5_0, GGMLType.IQ4_NL), "o": GGMLType.Q4_1,
                                      "gate": GGMLType.Q8_0, "up": GGMLType.Q8_0, "down": GGMLType.IQ4_NL})
    else:
        write_tiny_gguf(path, arch)
    shared = list(range(100, 140))
    prompts = [[shared + [7, 8], list(range(300, 323))], [shared + [9]]]
    for activations in ("float32", "int8") if arch == "llama" else ("float32",):
        monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", activations)
        _assert_same_run(path, prompts, tokenizer=str(smollm2_path), max_num_batched_tokens=16)


@pytest.mark.slow
def test_int8_weights_split_over_two_ranks_run_as_on_one(tmp_path, smollm2_path):
    """``--quantization int8`` on every rank: o_proj and down_proj hold some input columns of each row, so their scales
    come from the amax of the whole row (a max over the ranks), and every rank's quants are one rank's."""
    path = _with_random_biases(save_tiny_model(tmp_path / "m", smollm2_path, **dict(UNEVEN, hidden_size=192,
                                                                                     intermediate_size=256)))
    shared = list(range(100, 140))
    prompts = [[shared + [7, 8], list(range(300, 323))], [shared + [9]]]
    _assert_same_run(path, prompts, quantization="int8", max_num_batched_tokens=16)


def test_a_gguf_matrix_whose_blocks_a_split_would_cut_is_refused(tmp_path, smollm2_path):
    from tests.engine.test_gguf_kquants import write_tiny_kquant_gguf

    path = tmp_path / "tiny-q4_k_m.gguf"
    write_tiny_kquant_gguf(path)  # o_proj in Q6_K: 256-weight blocks, and each of 2 ranks holds 128 input columns
    with pytest.raises(ValueError, match="Q6_K matrix cannot be split at input column 128: its blocks hold 256"):
        LLMEngine(EngineConfig(model=str(path), tokenizer=str(smollm2_path), tensor_parallel_size=2,
                               num_kv_blocks=16))
