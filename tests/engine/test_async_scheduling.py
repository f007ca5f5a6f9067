"""Async scheduling (``async_scheduling=True``): step N + 1 is scheduled and run before step N's sampled ids are read
back, its pending tokens fed on the device. Outputs must equal the synchronous engine's for every kind of request
(stops, EOS-like stop ids, min_tokens, max_tokens, n > 1, seeds, logprobs, penalties, grammars, prefix hits, chunked
prefill, preemption, aborts, the padded graph path), with no block leaked; and the steps must really overlap."""

from __future__ import annotations

import pytest
import torch

from loom.engine.block_manager import BlockManager
from loom.engine.config import EngineConfig
from loom.engine.cuda_graphs import DecodeGraphs
from loom.engine.llm_engine import LLMEngine
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig
from loom.engine.sequence import PENDING, Sequence
from loom.engine.structured import StructuredOutputsParams
from tests.engine.test_parity import varied_prompts


def engine(model, **kwargs) -> LLMEngine:
    kwargs = {"block_size": 4, "max_num_batched_tokens": 64, "num_kv_blocks": 512, **kwargs}
    return LLMEngine(EngineConfig(model=str(model), **kwargs))


def run(eng: LLMEngine, requests, abort_after: dict[str, int] | None = None) -> dict:
    """Every request's final output (ids, text, finish and stop reason, logprobs); ``abort_after``: request id ->
    the step after which it is aborted."""
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(str(i), params=params, prompt_token_ids=prompt)
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs)
                                        for c in out.outputs]
        steps += 1
        for request_id, after in (abort_after or {}).items():
            if steps == after:
                eng.abort_request(request_id)
        assert steps < 2000
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert not eng.requests and eng._in_flight is None
    return done


def same(got: dict, expected: dict) -> bool:
    """Ids, text and reasons equal; log-probabilities of the same tokens within 1e-4: a step's batch differs between
    the two modes (async scheduling runs rows that a stop then drops), and matmuls over other batch shapes round
    differently in the last bits."""
    assert got.keys() == expected.keys()
    for key in got:
        assert len(got[key]) == len(expected[key])
        for a, b in zip(got[key], expected[key]):
            assert a[:4] == b[:4], key
            assert (a[4] is None) == (b[4] is None), key
            for lp_a, lp_b in zip(a[4] or (), b[4] or ()):
                assert lp_a.keys() == lp_b.keys() and all(abs(lp_a[t] - lp_b[t]) < 1e-4 for t in lp_a), key
    return True


def mixed_requests(stop_ids: list[int]) -> list:
    prompts = varied_prompts(12, seed=41, low=3, high=60)
    shared = prompts[0][:40] if len(prompts[0]) >= 40 else prompts[0] * 2
    prompts += [shared + [500 + i] for i in range(3)]  # prefix-cache hits on the same steps
    kinds = [
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=23, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=9, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids, min_tokens=6, ignore_eos=True),
        SamplingParams(n=2, temperature=0.7, seed=5, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=6, max_tokens=25, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, max_tokens=20, stop=["e"], ignore_eos=True),
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=20, stop=["e", "a"], ignore_eos=True),
    ]
    return [(p, kinds[i % len(kinds)]) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def stop_ids(tiny_llama):
    """Tokens the tiny model's greedy outputs reach within a few steps, so stop ids end some requests early."""
    eng = engine(tiny_llama)
    outs = run(eng, [(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                     for p in varied_prompts(12, seed=41, low=3, high=60)])
    return sorted({o[0][0][4] for o in outs.values()})


def test_async_gives_the_sync_outputs_for_every_kind_of_request(tiny_llama, stop_ids):
    requests = mixed_requests(stop_ids)
    sync = run(engine(tiny_llama), requests)
    asynchronous = run(engine(tiny_llama, async_scheduling=True), requests)
    assert same(asynchronous, sync)
    reasons = {c[2] for outs in sync.values() for c in outs}
    assert reasons == {"stop", "length"}  # the workload does end requests early, by stop ids and strings
    assert any(c[3] == "e" for outs in sync.values() for c in outs)
    # siblings that end on different steps: one finished while the other's next step was already in flight
    assert any(len({len(c[0]) for c in outs}) > 1 for outs in sync.values())


def test_async_with_chunked_prefill_and_preemption_gives_the_sync_outputs(tiny_llama):
    prompts = varied_prompts(8, seed=17, low=20, high=40)
    requests = [(p, SamplingParams(temperature=0.5, seed=i, max_tokens=40, ignore_eos=True))
                for i, p in enumerate(prompts)]
    expected = run(engine(tiny_llama, num_kv_blocks=1024), requests)
    tight = engine(tiny_llama, num_kv_blocks=40, max_num_batched_tokens=16, async_scheduling=True)
    assert same(run(tight, requests), expected)
    assert tight.stats().num_preemptions > 0


def test_async_with_penalties_and_grammars_gives_the_sync_outputs(tiny_llama):
    prompts = varied_prompts(6, seed=43, low=5, high=30)
    params = [
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=1, max_tokens=20, frequency_penalty=0.5, presence_penalty=0.3,
                       ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=["alpha", "beta gamma"])),
        SamplingParams(temperature=0.9, seed=2, max_tokens=12,
                       structured_outputs=StructuredOutputsParams(regex="[a-c]{3,8}")),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, max_tokens=20, ignore_eos=True,
                       logit_bias={300: 4.0, 301: -100.0}, allowed_token_ids=list(range(290, 340))),
    ]
    requests = list(zip(prompts, params))
    assert same(run(engine(tiny_llama, async_scheduling=True), requests), run(engine(tiny_llama), requests))


def test_async_on_the_padded_graph_path_gives_the_sync_outputs(tiny_llama, stop_ids):
    """The CUDA-graph path's static buffers (run eagerly, capture=False): pending tokens reach them on the device."""
    requests = mixed_requests(stop_ids)[:8]
    expected = run(engine(tiny_llama), requests)
    eng = engine(tiny_llama, max_num_seqs=16, async_scheduling=True)
    runner = eng.runner
    pools = [(torch.zeros(513, *k.shape[1:]), torch.zeros(513, *v.shape[1:])) for k, v in runner.kv_caches]
    runner.kv_caches = [(k[:512], v[:512]) for k, v in pools]
    runner.graphs = DecodeGraphs(eng.model, pools, torch.device("cpu"), max_num_seqs=16, max_blocks_per_seq=64,
                                 block_size=4, scratch_block=512, capture=False)
    fed = []
    run_graph = runner.graphs.run
    runner.graphs.run = lambda inputs: (fed.append(inputs.feed is not None), run_graph(inputs))[1]
    assert same(run(eng, requests), expected)
    assert sum(fed) > 5  # decode steps took the graph path with their tokens still on the device


def traced(eng: LLMEngine, requests, monkeypatch) -> list[tuple[str, bool | None]]:
    """Run ``requests``, recording each forward ("run", fed from a step in flight), each sampling ("sample") and
    each read-back ("read") in order."""
    from loom.engine import llm_engine
    from loom.ops import sampler

    events = []
    execute, sample, result = eng.runner.execute, llm_engine.sample_deferred, sampler.DeferredSample.result

    def traced_execute(out, in_flight=None):
        events.append(("run", in_flight is not None))
        return execute(out, in_flight)

    def traced_sample(logits, rows):
        events.append(("sample", None))
        return sample(logits, rows)

    def traced_result(self):
        events.append(("read", None))
        return result(self)

    monkeypatch.setattr(eng.runner, "execute", traced_execute)
    monkeypatch.setattr(llm_engine, "sample_deferred", traced_sample)
    monkeypatch.setattr(sampler.DeferredSample, "result", traced_result)
    run(eng, requests)
    return events


def test_async_steps_overlap_the_one_in_flight(tiny_llama, monkeypatch):
    """Step N + 1's forward and sampling are queued before step N's ids are read back, its pending tokens fed from
    N's device tensor."""
    events = traced(engine(tiny_llama, async_scheduling=True),
                    [(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
                     for p in varied_prompts(3, seed=44, low=4, high=9)], monkeypatch)
    runs = [e for e in events if e[0] == "run"]
    assert events[:5] == [("run", False), ("sample", None), ("run", True), ("sample", None), ("read", None)]
    assert sum(fed for _, fed in runs) == len(runs) - 1 == 5  # every step after the first took its tokens in flight


def test_a_row_with_penalties_or_a_grammar_reads_the_step_before_after_the_forward(tiny_llama, monkeypatch):
    """Its sampling needs the pending token on the host: N is read between N + 1's forward and N + 1's sampling
    (so the forward still overlaps the step in flight)."""
    for params in (SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.5, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=6, structured_outputs=StructuredOutputsParams(
                       regex="[a-z ]{20,40}"))):
        events = traced(engine(tiny_llama, async_scheduling=True), [(varied_prompts(1, seed=46)[0], params)],
                        monkeypatch)
        assert events[:5] == [("run", False), ("sample", None), ("run", True), ("read", None), ("sample", None)]


def test_aborting_a_request_in_flight_leaks_nothing_and_others_are_unchanged(tiny_llama):
    requests = [(p, SamplingParams(n=2, temperature=0.6, seed=i, max_tokens=30, ignore_eos=True))
                for i, p in enumerate(varied_prompts(5, seed=45))]
    expected = run(engine(tiny_llama), requests)
    got = run(engine(tiny_llama, async_scheduling=True), requests, abort_after={"1": 4, "3": 9})
    assert set(got) == {"0", "2", "4"}
    assert same(got, {k: expected[k] for k in got})


def test_async_scheduling_refuses_what_it_does_not_run_with():
    with pytest.raises(ValueError, match="speculative decoding"):
        EngineConfig(async_scheduling=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="tensor parallelism"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)


def test_pending_tokens_count_but_are_never_hashed_or_read_as_ids():
    seq = Sequence(0, "r", 0, [1, 2, 3], SamplingParams(max_tokens=5), 0.0, output_token_ids=[4])
    seq.num_pending = 1
    assert seq.num_tokens == 5 and seq.num_known_tokens == 4
    assert seq.token_slice(3, 5) == [4, PENDING] and seq.token_slice(4, 5) == [PENDING]
    assert len(seq.tokens) == 4 and seq.tokens[0:10] == [1, 2, 3, 4]
    bm = BlockManager(8, 2)
    assert bm.allocate(0, seq.tokens, 5)
    assert len(bm.seq_hashes[0]) == 2  # the block holding the pending token is not hashed


def test_the_scheduler_skips_sequences_whose_pending_tokens_end_them():
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    ends, goes = (Sequence(i, str(i), 0, [1, 2, 3], SamplingParams(max_tokens=2), 0.0) for i in range(2))
    for seq in (ends, goes):
        sched.add(seq)
    sched.update(sched.schedule())
    ends.output_token_ids.append(7)
    ends.num_pending = goes.num_pending = 1  # ends: 1 read + 1 pending = max_tokens
    out = sched.schedule()
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(goes, 3, 1)]
