"""N-gram speculative decoding: config, the proposer's matching, scheduler and block accounting with drafts (exact
block ids, no hash over draft tokens), then whole runs: greedy output identical with and without speculation (tiny
random Llama with real and oracle drafts; SmolLM2 on copy-heavy prompts), stops and max_tokens inside accepted
drafts, penalties and logprobs, preemption, structured outputs beside drafts, seeded sampling, no leaked blocks."""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pytest

from loom import LLM, SamplingParams
from loom.engine.block_manager import hash_block
from loom.engine.config import EngineConfig, SpeculativeConfig
from loom.engine.spec_decode import NgramProposer, SpecDecoder, ngram_lookup
from loom.flags import add_config_arguments, config_from_args
from tests.conftest import save_tiny_model
from tests.engine.test_engine import assert_no_leaks, gen
from tests.engine.test_parity import varied_prompts
from tests.engine.test_scheduler import make, make_seq, run_step

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


# --- config ----------------------------------------------------------------------------------------------------
def test_config_takes_vllm_keys_and_defaults():
    assert EngineConfig(speculative_config=NGRAM).speculative_config == SpeculativeConfig("ngram", 4, 3, 1)
    # vLLM: neither bound given -> both 5; one given -> the other equals it; "[ngram]" is the old spelling.
    assert (SpeculativeConfig("ngram", 2).prompt_lookup_min, SpeculativeConfig("ngram", 2).prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_dict({"method": "[ngram]", "num_speculative_tokens": 5, "prompt_lookup_max": 4})
    assert (only_max.method, only_max.prompt_lookup_min, only_max.prompt_lookup_max) == ("ngram", 4, 4)


@pytest.mark.parametrize("values, message", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "method must be 'ngram'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "x"}, "unknown key(s) model"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
])  # fmt: skip
def test_bad_config_says_what_is_wrong(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(speculative_config=values)


def test_cli_flag_takes_json_and_refuses_bad_json(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EngineConfig)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert config_from_args(EngineConfig, args).speculative_config == SpeculativeConfig("ngram", 2, 5, 5)
    assert config_from_args(EngineConfig, parser.parse_args([])).speculative_config is None
    for bad, message in [("{method: ngram}", "not valid JSON"), ('{"method": "x", "num_speculative_tokens": 1}',
                                                                   "speculative_config method must be 'ngram'")]:
        with pytest.raises(SystemExit):
            parser.parse_args(["--speculative-config", bad])
        assert f"argument --speculative-config: {message}" in capsys.readouterr().err


# --- proposer ----------------------------------------------------------------------------------------------------
def lookup(tokens, min_n=1, max_n=3, k=4):
    return ngram_lookup(np.array(tokens), min_n, max_n, k)


def test_ngram_lookup_prefers_the_longest_then_the_latest_match():
    # Suffix [1, 2, 3]: its 3-gram occurs once (followed by 4, 5); its 1-gram [3] later too (followed by 9).
    assert lookup([1, 2, 3, 4, 5, 7, 3, 9, 8, 1, 2, 3]) == [4, 5, 7, 3]
    # Two occurrences of the same 2-gram: the later one's continuation wins.
    assert lookup([5, 6, 1, 2, 6, 1, 3, 0, 6, 1], max_n=2) == [3, 0, 6, 1]
    assert lookup([1, 2, 3, 4, 5, 7, 3, 9, 8, 1, 2, 3], max_n=1) == [9, 8, 1, 2]


def test_ngram_lookup_edges():
    assert lookup([1, 2, 3, 4]) == []  # nothing repeats
    assert lookup([7]) == [] and lookup([]) == []
    assert lookup([1, 2, 9, 2], min_n=2) == []  # only a 1-gram matches
    assert lookup([1, 2, 3, 1, 2], k=10) == [3, 1, 2]  # the continuation runs to the end of the history
    assert lookup([1, 2, 3, 1, 2], k=1) == [3]
    assert lookup([4, 4, 4, 4]) == [4]  # overlapping match of a run
    assert lookup([1, 2, 3, 1, 2], max_n=50) == [3, 1, 2]  # max_n longer than the history
    assert lookup([1, 2, 3, 1, 2], k=0) == []


def test_proposals_stop_at_max_tokens_and_context_and_skip_grammars():
    spec = SpecDecoder(SpeculativeConfig(**NGRAM), max_model_len=40)
    seq = make_seq([1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    seq.params = SamplingParams(max_tokens=5)
    spec.propose([seq], num_running=1)
    assert seq.draft_token_ids == [3, 4, 1, 2]
    seq.output_token_ids = [3, 4]  # 2 of 5 generated: 2 drafts + 1 sampled token at most
    spec.propose([seq], num_running=1)
    assert seq.draft_token_ids == [1, 2]
    seq.params, seq.output_token_ids = SamplingParams(max_tokens=30), []
    seq.prompt_token_ids = [1, 2, 3] * 12 + [1, 2]  # 38 of 40 tokens: one draft, then one sampled token
    spec.propose([seq], num_running=1)
    assert seq.draft_token_ids == [3]
    seq.prompt_token_ids = [1, 2, 3] * 4
    seq.matcher = object()
    spec.propose([seq], num_running=1)
    assert seq.draft_token_ids == []
    seq.matcher = None
    spec.config.disable_by_batch_size = 8
    spec.propose([seq], num_running=8)
    assert seq.draft_token_ids == []


# --- scheduler and blocks --------------------------------------------------------------------------------------
def test_decode_with_drafts_is_one_chunk_with_exact_blocks_and_no_draft_hash():
    sched = make(num_blocks=16, block_size=4)
    bm = sched.block_manager
    seq = make_seq(list(range(6)))
    sched.add(seq)
    run_step(sched)  # prefill of 6, samples 7: tokens 0..5, 7
    seq.draft_token_ids = [8, 9, 10, 11]
    out = sched.schedule()
    chunk = out.chunks[0]
    assert (chunk.start, chunk.num_tokens, chunk.token_ids, chunk.samples) == (6, 5, [7, 8, 9, 10, 11], True)
    assert out.num_batched_tokens == 5
    assert bm.block_table(seq.seq_id) == [0, 1, 2]  # positions 6..10 reach into block 2
    # Block 1 holds 4, 5, 7 and the draft 8: full only with a draft, so it is not hashed, nor is block 2.
    assert bm.blocks[0].hash is not None and bm.blocks[1].hash is None and bm.blocks[2].hash is None
    sched.update(out)
    sched.reject_drafts(chunk, 1)  # 8 accepted, 9 rejected; the engine appends 8 and the correction 20
    assert seq.num_computed_tokens == 8
    seq.output_token_ids += [8, 20]
    seq.draft_token_ids = []
    out = sched.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(8, 1)]
    # Now that 8 is verified, block 1 is hashed over the verified tokens.
    assert bm.blocks[1].hash == hash_block(bm.blocks[0].hash, [4, 5, 7, 8])
    assert bm.block_table(seq.seq_id) == [0, 1, 2]


def test_rejected_drafts_never_become_a_prefix_cache_hit():
    sched = make(num_blocks=16, block_size=4)
    bm = sched.block_manager
    seq = make_seq([10, 11, 12])
    sched.add(seq)
    run_step(sched, next_token=13)  # tokens 10..13: block 0 full
    seq.draft_token_ids = [14, 15, 16, 17]  # would fill block 1 exactly
    out = sched.schedule()
    sched.update(out)
    sched.reject_drafts(out.chunks[0], 0)
    seq.output_token_ids.append(30)  # the correction, written over the first draft's slot next step
    seq.draft_token_ids = []
    sched.update(sched.schedule())
    # A prompt equal to the tokens plus the rejected drafts hits block 0 only, never the overwritten block 1.
    assert bm.find_cached_prefix([10, 11, 12, 13, 14, 15, 16, 17, 18]) == [0]
    for token in (31, 32, 33):  # block 1 fills with verified tokens: now it is a hit for exactly those
        seq.output_token_ids.append(token)
        sched.update(sched.schedule())
    assert bm.find_cached_prefix([10, 11, 12, 13, 30, 31, 32, 33, 5]) == bm.block_table(seq.seq_id)[:2]


def test_drafts_fit_the_budget_and_never_preempt():
    sched = make(num_blocks=16, block_size=4, max_num_batched_tokens=3)
    seq = make_seq([1, 2])
    sched.add(seq)
    run_step(sched)  # 3 tokens
    seq.draft_token_ids = [4, 5, 6, 7]
    out = sched.schedule()
    assert out.chunks[0].draft_token_ids == [4, 5] and out.num_batched_tokens == 3
    # A pool with no block to spare: the sequence decodes one token, nobody is preempted.
    sched = make(num_blocks=2, block_size=4)
    a, b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both hold 4 tokens in one full block each
    a.draft_token_ids = [9, 9]
    out = sched.schedule()
    assert out.preempted == []
    assert [(c.seq, c.num_tokens, c.draft_token_ids) for c in out.chunks] == [(a, 1, []), (b, 1, [])]


def test_preemption_drops_the_drafts():
    sched = make(num_blocks=2, block_size=4)
    a, b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)  # 5 tokens each, 4 computed: both blocks full
    b.draft_token_ids = [1, 2]
    out = sched.schedule()  # a needs a second block: b, the newest, is preempted and its drafts dropped
    assert out.preempted == [b] and b.draft_token_ids == []
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 1)]


# --- whole runs on the tiny model -------------------------------------------------------------------------------
class Oracle:
    """Proposes the reference greedy continuation, every ``wrong_every``-th output position corrupted (0: none)."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], wrong_every: int = 0):
        self.reference, self.wrong_every = reference, wrong_every

    def propose(self, seq, k: int) -> list[int]:
        done = seq.num_output_tokens
        ahead = self.reference.get(tuple(seq.prompt_token_ids), [])[done : done + k]
        return [t if not self.wrong_every or (done + j) % self.wrong_every else t + 1 for j, t in enumerate(ahead)]


@pytest.fixture(scope="module")
def base(tiny_llama):
    return LLM(str(tiny_llama), block_size=4, max_num_batched_tokens=128, num_kv_blocks=1024)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return LLM(str(tiny_llama), block_size=4, max_num_batched_tokens=128, num_kv_blocks=1024,
               speculative_config=NGRAM)


def prompts_with_repeats() -> list[list[int]]:
    return [*varied_prompts(4, seed=30, low=5, high=40), [7, 8, 9] * 10, list(range(200, 230)) * 2]


def reference(base, prompts, params) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, gen(base, prompts, params))}


@pytest.mark.parametrize("wrong_every", [None, 0, 3])
def test_greedy_output_is_identical_with_real_and_oracle_drafts(base, spec, wrong_every):
    prompts = prompts_with_repeats()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = reference(base, prompts, params)
    spec.engine.spec.proposer = Oracle(expected, wrong_every) if wrong_every is not None else _ngram(spec)
    before = spec.engine.stats()
    got = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, gen(spec, prompts, params))}
    assert got == expected
    stats = spec.engine.stats()
    proposed = stats.num_spec_draft_tokens - before.num_spec_draft_tokens
    accepted = stats.num_spec_accepted_tokens - before.num_spec_accepted_tokens
    assert proposed > 0
    if wrong_every == 0:  # every draft right: all accepted, up to 5 tokens a step (40 steps without)
        assert accepted == proposed and stats.num_steps - before.num_steps < 15
    elif wrong_every == 3:
        assert 0 < accepted < proposed
    assert_no_leaks(spec)


def _ngram(llm):
    return NgramProposer(NGRAM["prompt_lookup_min"], NGRAM["prompt_lookup_max"])


def test_stops_and_max_tokens_inside_accepted_drafts(base, spec):
    """Drafts that run past a stop string, a stop id or max_tokens: the output ends exactly where plain decoding
    ends it (same tokens, text, finish and stop reasons)."""
    prompt = varied_prompts(1, seed=31)[0]
    full = gen(base, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    spec.engine.spec.proposer = Oracle({tuple(prompt): full.token_ids})
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cases = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 5, 6, 30)] + [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[full.token_ids[6]]),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[full.token_ids[2]], min_tokens=4),
    ]
    for params in cases:
        want = gen(base, [prompt], params)[0].outputs[0]
        got = gen(spec, [prompt], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason), params
    assert spec.engine.stats().num_spec_accepted_tokens > 0
    assert_no_leaks(spec)


def test_penalties_and_logprobs_match_plain_decoding(base, spec):
    prompts = varied_prompts(3, seed=32, low=10, high=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.3, logprobs=2,
                            logit_bias={500: 3.0, 501: 2.0}, allowed_token_ids=list(range(400, 700)))
    want = gen(base, prompts, params)
    spec.engine.spec.proposer = Oracle({tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, want)}, 4)
    got = gen(spec, prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys()
            assert all(abs(lw[t] - lg[t]) < 1e-4 for t in lw)
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-3)


def test_preemption_with_drafts_keeps_output_and_frees_every_block(tiny_llama, base):
    prompts = varied_prompts(8, seed=33, low=20, high=40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = reference(base, prompts, params)
    tight = LLM(str(tiny_llama), block_size=4, num_kv_blocks=40, speculative_config=NGRAM)
    tight.engine.spec.proposer = Oracle(expected)
    got = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, gen(tight, prompts, params))}
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0 and stats.num_spec_accepted_tokens > 0
    assert got == expected
    assert_no_leaks(tight)


def test_structured_rows_decode_one_token_beside_speculative_ones(base, spec):
    prompts = [[7, 8, 9] * 10, varied_prompts(1, seed=34)[0]]
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": "[a-z ]{5,40}"})
    spec.engine.spec.proposer = _ngram(spec)
    expected = [o.outputs[0] for o in base.generate([{"prompt_token_ids": p} for p in prompts], [free, constrained])]
    got = [o.outputs[0] for o in spec.generate([{"prompt_token_ids": p} for p in prompts], [free, constrained])]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert spec.engine.stats().num_mixed_steps > 0
    assert_no_leaks(spec)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(spec):
    spec.engine.spec.proposer = _ngram(spec)
    target = [7, 8, 9] * 10
    seeded = SamplingParams(temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True)
    alone = gen(spec, [target], seeded)[0].outputs[0].token_ids
    others = prompts_with_repeats()
    mixed = spec.generate([{"prompt_token_ids": p} for p in [*others[:3], target, *others[3:]]],
                          [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3 + [seeded]
                          + [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, ignore_eos=True)] * 3)
    assert mixed[3].outputs[0].token_ids == alone
    assert_no_leaks(spec)


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, smollm2_path):
    """The tiny Llama with a 512-token vocabulary, so that sampling thousands of rows a step stays cheap."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-512"), smollm2_path, vocab_size=512)


def test_sampled_tokens_follow_the_plain_distribution(small_vocab):
    """Temperature 1, top-k 4, 2,000 seeded samples each way, drafts = the prompt's greedy continuation (accepted
    ~17% of the time): the tokens at output positions 1 and 2 have the same frequencies with and without
    speculation, within sampling noise. Measured with 8,000 a side, plain vs speculative differ by as much as plain
    vs plain with other seeds (total variation 0.017 / 0.020 at position 1, 0.042 / 0.038 at 2); always accepting
    the drafts would move position 1 by ~0.7. ``tests/ops/test_rejection_sampler.py`` checks exactness."""
    kw = dict(block_size=4, num_kv_blocks=4096, max_num_seqs=512, max_num_batched_tokens=4096)
    base, spec = LLM(str(small_vocab), **kw), LLM(str(small_vocab), speculative_config=NGRAM, **kw)
    prompt = list(range(3, 40))
    greedy = gen(base, [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    spec.engine.spec.proposer = Oracle({tuple(prompt): greedy.token_ids})
    params = SamplingParams(n=2000, temperature=1.0, top_k=4, seed=0, max_tokens=3, ignore_eos=True)
    plain = [c.token_ids for c in gen(base, [prompt], params)[0].outputs]
    specd = [c.token_ids for c in gen(spec, [prompt], params.clone(seed=100_000))[0].outputs]
    assert spec.engine.stats().num_spec_accepted_tokens > 300
    for pos, bound in ((1, 0.08), (2, 0.15)):
        fa, fb = Counter(t[pos] for t in plain), Counter(t[pos] for t in specd)
        tv = 0.5 * sum(abs(fa[t] - fb[t]) for t in fa.keys() | fb.keys()) / len(plain)
        assert tv < bound, (pos, tv, fa.most_common(5), fb.most_common(5))
    assert_no_leaks(spec)


# --- SmolLM2 ---------------------------------------------------------------------------------------------------
CODE = '''def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    return result + a[i:] + b[j:]
'''
QUOTE = ("The lighthouse stood on the northern cliff for two hundred years. Its keeper climbed the ninety steps "
         "every evening to light the lamp, and every morning to put it out.")


@pytest.mark.slow
def test_smollm2_greedy_output_is_identical_on_copy_heavy_prompts():
    """Real drafts on a real model, one batch: code to repeat with an edit, a text to quote with a stop string that
    falls inside accepted drafts, a free question, and max_tokens 3."""
    kw = dict(kv_cache_memory_gb=0.25, max_num_batched_tokens=512)
    base, spec = LLM("smollm2", **kw), LLM("smollm2", speculative_config=NGRAM, **kw)
    chats = [[{"role": "user", "content": text}] for text in (
        f"Rename merge_sorted to merge_lists and repeat the code:\n\n{CODE}",
        f"Repeat this text word for word:\n\n{QUOTE}",
        "Name three rivers in Europe.",
        f"Repeat this code:\n\n{CODE}",
    )]
    params = [SamplingParams(temperature=0, max_tokens=48, stop=stop) for stop in ([], ["ninety"])] + [
        SamplingParams(temperature=0, max_tokens=16), SamplingParams(temperature=0, max_tokens=3)]
    want, got = base.chat(chats, params), spec.chat(chats, params)
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            w.token_ids, w.text, w.finish_reason, w.stop_reason)
    assert got[1].outputs[0].stop_reason == "ninety" and len(got[3].outputs[0].token_ids) == 3
    stats = spec.engine.stats()
    assert stats.spec_acceptance_rate > 0.3 and stats.num_steps < base.engine.stats().num_steps * 0.6
    assert_no_leaks(spec)
