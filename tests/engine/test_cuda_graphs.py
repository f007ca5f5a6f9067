"""The CUDA-graph decode path's padded static buffers, run eagerly on CPU (capture=False): the same tokens and
logprobs as the plain path, padded rows confined to the scratch block, the buckets vLLM captures; and the KV budget
gpu_memory_utilization leaves."""

from __future__ import annotations

import pytest
import torch

from loom.engine.config import EngineConfig
from loom.engine.cuda_graphs import DecodeGraphs, batch_buckets
from loom.engine.llm_engine import LLMEngine, kv_budget_bytes
from loom.engine.sampling_params import SamplingParams
from tests.engine.test_parity import varied_prompts


def test_buckets_cover_every_batch_size_up_to_max_num_seqs():
    assert batch_buckets(128)[:6] == [1, 2, 4, 8, 16, 24] and batch_buckets(128)[-1] == 128
    assert batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(1) == [1]


def _run(engine: LLMEngine, prompts) -> dict:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=ids, params=params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (c.token_ids, [lp[t] for lp, t in zip(c.logprobs, c.token_ids)])
    return done


def test_padded_static_decode_gives_the_eager_tokens_and_touches_only_the_scratch_block(tiny_llama):
    prompts = varied_prompts(3, seed=21, low=5, high=30)  # 3 sequences decode as bucket 4: one padded row
    plain = _run(LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32, block_size=8)), prompts)

    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32, block_size=8, max_num_seqs=8))
    runner = engine.runner
    # one pool of 33 blocks: the engine sees the first 32, the 33rd is the scratch block
    pools = [(torch.zeros(33, *k.shape[1:]), torch.zeros(33, *v.shape[1:])) for k, v in runner.kv_caches]
    runner.kv_caches = [(k[:32], v[:32]) for k, v in pools]
    graphs = DecodeGraphs(engine.model, pools, torch.device("cpu"), max_num_seqs=8, max_blocks_per_seq=8,
                          block_size=8, scratch_block=32, capture=False)
    batches = []
    run = graphs.run
    graphs.run = lambda inputs: (batches.append(len(inputs.input_ids)), run(inputs))[1]
    runner.graphs = graphs
    assert _run(engine, prompts) == plain
    assert batches and 3 in batches  # decode steps took the padded path (3 rows in a bucket of 4)
    assert all(k[32].abs().sum() > 0 for k, _ in pools)  # the padded row wrote into the scratch block
    assert graphs.bucket(3) == 4 and graphs.bucket(9) is None


def test_gpu_memory_utilization_leaves_the_kv_pool_what_the_weights_activations_and_others_do_not_use():
    gib = 2**30
    # an 80 GiB GPU, 0.9 of it ours; a 6 GiB peak (weights + the largest step), another process holding 10 GiB
    assert kv_budget_bytes(80 * gib, 64 * gib, 6 * gib, 6 * gib, 0.9) == 0.9 * 80 * gib - 6 * gib - 10 * gib
    assert kv_budget_bytes(80 * gib, 4 * gib, 6 * gib, 6 * gib, 0.5) == 0.0  # nothing left: 0, never negative
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
