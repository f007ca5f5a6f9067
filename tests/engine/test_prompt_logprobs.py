"""Prompt logprobs (``SamplingParams.prompt_logprobs``, vLLM's; what lm-eval's loglikelihood tasks read through
``echo`` + ``logprobs``): every prompt token's log-probability and the top ones, equal to HF transformers' log-softmax,
through chunked prefill, beside plain requests, and with a cached prefix available (computed whole anyway)."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams


@pytest.fixture(scope="module")
def reference(tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def test_prompt_logprobs_equal_transformers(tiny_llama, reference):
    shared = list(range(100, 140))
    prompts = [shared + list(range(200, 230)), shared + [5, 6, 7], [42]]
    # chunks of at most 32 tokens: the 70-token prompt is scored over three steps
    llm = LLM(str(tiny_llama), num_kv_blocks=64, max_num_batched_tokens=32)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1))  # its blocks now in the cache
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts] + [{"prompt_token_ids": shared}],
                        [params] * 3 + [SamplingParams(max_tokens=2, temperature=0)])
    for ids, out in zip(prompts, outs):
        assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[0] is None
        ref = reference(ids)
        for j in range(1, len(ids)):
            entry = out.prompt_logprobs[j]
            assert next(iter(entry)) == ids[j]  # the prompt token first
            assert entry[ids[j]] == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
            top = ref[j - 1].topk(3)
            for token, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[token] == pytest.approx(value, abs=1e-4)
            assert len(entry) in (3, 4)  # the prompt token, unless among the top 3
            # the tokens at least as likely (vLLM's count), up to the float differences with HF's forward
            row, own = ref[j - 1], ref[j - 1, ids[j]]
            assert int((row > own + 1e-4).sum()) + 1 <= out.prompt_ranks[j] <= int((row >= own - 1e-4).sum())
        assert out.prompt_ranks[0] is None and len(out.prompt_ranks) == len(ids)
    assert outs[3].prompt_logprobs is None and outs[3].num_cached_tokens == 32  # a plain request still hits


def test_prompt_logprobs_zero_gives_each_tokens_own(tiny_llama, reference):
    """Also with n = 2: the prompt is the request's, scored once (on its first sequence)."""
    ids = list(range(300, 320))
    out = LLM(str(tiny_llama), num_kv_blocks=32).generate(
        [{"prompt_token_ids": ids}], SamplingParams(n=2, max_tokens=1, prompt_logprobs=0))[0]
    assert len(out.outputs) == 2 and len(out.prompt_logprobs) == len(ids)
    ref = reference(ids)
    assert [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in ids[1:]]
    assert [e[t] for e, t in zip(out.prompt_logprobs[1:], ids[1:])] == pytest.approx(
        [ref[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-4)
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)


def test_a_recomputed_prompt_scores_only_the_tokens_it_has_not_scored():
    """After preemption by recompute a prompt runs again from its start: only positions past the ones scored before
    give rows, and the last prompt position (the sampling row) never does."""
    from types import SimpleNamespace

    from loom.engine.model_runner import _prompt_logprob_rows

    prompt = list(range(1000, 1070))
    seq = SimpleNamespace(prompt_token_ids=prompt, prompt_logprobs=[None] + [{}] * 32)  # tokens 0..32 scored
    rows, targets = _prompt_logprob_rows(SimpleNamespace(seq=seq, start=0, end=40), first_row=5)
    assert rows == range(5 + 32, 5 + 40) and targets == prompt[33:41]
    rows, targets = _prompt_logprob_rows(SimpleNamespace(seq=seq, start=40, end=70), first_row=0)
    assert rows == range(0, 29) and targets == prompt[41:70]  # position 69 samples the first output token
    assert _prompt_logprob_rows(SimpleNamespace(seq=seq, start=0, end=20), first_row=0) == (range(0), [])


def test_offline_outputs_carry_vllm_logprob_objects(tiny_llama, reference):
    """``LLM.generate``'s logprobs are vLLM's ``Logprob`` objects (``.logprob``, ``.rank``, ``.decoded_token``) that
    are the floats too: ranks against transformers' log-softmax, the own token's rank None where it is not among the
    top k (a sampled token), and prompt tokens ranked by the engine."""
    import json

    from loom.engine.outputs import Logprob

    llm = LLM(str(tiny_llama), num_kv_blocks=32)
    tokenizer = llm.engine.tokenizer
    prompt = list(range(300, 312))
    greedy, sampled = llm.generate([{"prompt_token_ids": prompt}] * 2, [
        SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2),
        SamplingParams(max_tokens=12, temperature=5.0, seed=1, logprobs=1)])
    ref = reference(prompt + greedy.outputs[0].token_ids)
    for position, (token, entries) in enumerate(zip(greedy.outputs[0].token_ids, greedy.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + position]
        order = torch.argsort(row, descending=True).tolist()
        assert all(isinstance(lp, Logprob) for lp in entries.values())
        for t, lp in entries.items():
            assert lp.rank == order.index(t) + 1 and lp.logprob == float(lp) == pytest.approx(row[t].item(), abs=2e-4)
            assert lp.decoded_token == tokenizer.decode([t])
        assert entries[token].rank == 1 and len(entries) == 3  # greedy: the own token is the top one
    for position, lp in enumerate(greedy.prompt_logprobs[1:], start=1):
        own = lp[prompt[position]]
        assert own.rank == greedy.prompt_ranks[position] == torch.argsort(ref[position - 1], descending=True).tolist(
            ).index(prompt[position]) + 1
    # a hot sample falls outside the top one now and then: its rank is unknown, the listed top one's is 1
    outside = [(t, e) for t, e in zip(sampled.outputs[0].token_ids, sampled.outputs[0].logprobs) if len(e) == 2]
    assert outside and all(e[t].rank is None and max(e.values()).rank == 1 for t, e in outside)
    assert json.loads(json.dumps(greedy.outputs[0].logprobs[0]))  # still floats to JSON


def test_one_token_prompt_chunks_score_their_token(tiny_llama, reference):
    """A prompt chunk of one token (here the step's last budget token, after a 15-token prompt in a 16-token step)
    is scheduled as a decode: it scores its token like any prompt chunk (it was skipped, leaving the list short:
    None for the whole request), and after preemption the recomputed scores stay aligned with their tokens."""
    prompts = [list(range(300, 315)), list(range(400, 412))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0)
    for engine in (dict(num_kv_blocks=64), dict(num_kv_blocks=10, block_size=4)):  # the second one preempts
        llm = LLM(str(tiny_llama), max_num_batched_tokens=16, **engine)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for ids, out in zip(prompts, outs):
            assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
            ref = reference(ids)
            for j in range(1, len(ids)):
                assert set(out.prompt_logprobs[j]) == {ids[j]}
                assert abs(out.prompt_logprobs[j][ids[j]].logprob - ref[j - 1, ids[j]].item()) < 1e-4
    assert llm.engine.stats().num_preemptions > 0
