"""Sampler against plain-PyTorch references: penalties, top-k / top-p / min-p, greedy, distribution."""

from __future__ import annotations

import torch

from loom.ops import sampler
from loom.ops.sampler import SamplingRow, SamplingSettings, sample


def row(output=(), prompt=(1,), seed=0, stop_ids=frozenset(), **params) -> SamplingRow:
    g = torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingSettings(**params), list(prompt), list(output), g, stop_ids)


def test_penalties_match_reference_formulas():
    torch.manual_seed(0)
    logits = torch.randn(1, 20) * 3
    r = row(output=[3, 3, 7], prompt=[5, 7], repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    got = sampler.apply_penalties(logits, [r])[0]
    ref = logits[0].clone()
    for t in {3, 5, 7}:
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    ref[3] -= 0.25 * 2 + 0.5
    ref[7] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(got, ref)


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 10.0
    r = row(output=[1], min_tokens=2, temperature=0, stop_ids=frozenset({4}))
    assert sample(logits, [r]).token_ids[0] != 4
    r2 = row(output=[1, 2], min_tokens=2, temperature=0, stop_ids=frozenset({4}))
    assert sample(logits, [r2]).token_ids[0] == 4


def test_top_k_top_p_keep_exactly_the_reference_set():
    torch.manual_seed(1)
    x = torch.randn(3, 50)
    got = sampler._top_k_top_p(x, [5, 0, 10], [1.0, 0.6, 0.5])
    for i, (k, p) in enumerate([(5, 1.0), (0, 0.6), (10, 0.5)]):
        order = x[i].argsort(descending=True)
        keep = set(order[: k or 50].tolist())
        probs = torch.softmax(x[i][order[: k or 50]], -1)
        mass, nucleus = 0.0, set()
        for tok, pr in zip(order[: k or 50].tolist(), probs.tolist()):
            if mass > p:
                break
            nucleus.add(tok)
            mass += pr
        expected = keep & nucleus
        assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) == expected


def test_greedy_and_sampled_frequencies():
    torch.manual_seed(2)
    logits = torch.randn(1, 30) * 2
    assert sample(logits, [row(temperature=0)]).token_ids == [int(logits.argmax())]
    r = row(seed=7, temperature=1.0)
    counts = torch.bincount(torch.tensor([sample(logits, [r]).token_ids[0] for _ in range(8000)]), minlength=30)
    assert (counts / 8000 - torch.softmax(logits[0], -1)).abs().max() < 0.02


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    r = row(seed=3, temperature=1.0, min_p=0.2)
    seen = {sample(logits, [r]).token_ids[0] for _ in range(500)}
    assert seen == {0, 1, 2}


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(1, 12)
    r = row(temperature=0, logprobs=2, repetition_penalty=2.0, prompt=[int(logits.argmax())])
    res = sample(logits, [r])
    lp = torch.log_softmax(logits[0], -1)
    token = res.token_ids[0]
    assert abs(res.logprobs[0][token] - float(lp[token])) < 1e-6
    top = lp.topk(2).indices.tolist()
    assert set(top) <= set(res.logprobs[0])
