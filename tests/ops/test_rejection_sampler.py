"""Draft verification: greedy acceptance, the sampled distribution kept exactly (against exact references and the
plain sampler, on fixed logits over many trials), penalties that see the drafts, logprobs per emitted row."""

from __future__ import annotations

import torch

from loom.ops.rejection_sampler import row_index, verify
from loom.ops.sampler import SamplingRow, SamplingSettings, sample


def row(output=(), seed=0, **params) -> SamplingRow:
    return SamplingRow(SamplingSettings(**params), [1], list(output), seed, frozenset())


def peaked(*argmaxes: int, vocab: int = 10) -> torch.Tensor:
    """One logits row per argmax: that token at 5, the rest 0."""
    logits = torch.zeros(len(argmaxes), vocab)
    logits[torch.arange(len(argmaxes)), list(argmaxes)] = 5.0
    return logits


def test_row_index_follows_the_runner_layout():
    # Three sequences with 2, 0 and 1 drafts: rows 0..2 first, then 3-4 (seq 0's drafts), 5 (seq 2's).
    assert row_index([[7, 8], [], [9]]) == [[0, 3, 4], [1], [2, 5]]


def test_greedy_accepts_while_drafts_equal_the_argmax_then_corrects_or_adds_a_bonus():
    # seq 0 drafts [4, 6]: rows 0, 3, 4 argmax 4, 6, 2 -> all accepted + bonus 2.
    # seq 1 no drafts: row 1 argmax 8. seq 2 drafts [1, 1]: rows 2, 5, 6 argmax 1, 3, 9 -> 1 accepted, correction 3.
    logits = peaked(4, 8, 1, 6, 2, 3, 9)
    rows = [row(temperature=0) for _ in range(3)]
    out = verify(logits, rows, [[4, 6], [], [1, 1]])
    assert out.token_ids == [[4, 6, 2], [8], [1, 3]]
    assert out.num_accepted == [2, 0, 1]
    rejected_first = verify(peaked(4, 6, 2), [row(temperature=0)], [[5, 6]])
    assert (rejected_first.token_ids, rejected_first.num_accepted) == ([[4]], [0])


def test_penalties_see_the_drafts_before_each_row():
    # Row 1 would pick token 3, but the draft before it generated 3 and a frequency penalty of 10 moves it to 7.
    logits = torch.zeros(2, 10)
    logits[0, 3] = 5.0
    logits[1, 3], logits[1, 7] = 5.0, 4.0
    out = verify(logits, [row(temperature=0, frequency_penalty=10.0)], [[3]])
    assert out.token_ids == [[3, 7]]
    # min_tokens masks the stop id 2 in row 0 (nothing generated yet) but not in row 1 (the draft 5 before it).
    logits = peaked(2, 2)
    logits[:, 5] = 4.0
    r = SamplingRow(SamplingSettings(temperature=0, min_tokens=1), [1], [], 0, frozenset({2}))
    assert verify(logits, [r], [[5]]).token_ids == [[5, 2]]


def test_logprobs_are_the_raw_rows_of_each_emitted_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    drafts = [int(logits[0].argmax()), (int(logits[1].argmax()) + 1) % 12]
    out = verify(logits, [row(temperature=0, logprobs=2)], [drafts])
    assert len(out.token_ids[0]) == 2  # the second draft is not row 1's argmax
    raw = torch.log_softmax(logits, dim=-1)
    for lp, r, t in zip(out.logprobs[0], (0, 1), out.token_ids[0]):
        assert lp[t] == float(raw[r, t]) and len(lp) >= 2


def test_without_drafts_a_sampled_row_draws_exactly_what_sample_draws():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    for seed in range(5):
        settings = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
        plain = sample(logits, [row(seed=seed + 10 * i, **settings) for i in range(4)]).token_ids
        spec = verify(logits, [row(seed=seed + 10 * i, **settings) for i in range(4)], [[]] * 4).token_ids
        assert [t[0] for t in spec] == plain


def test_top_k_one_makes_sampled_verification_deterministic():
    logits = peaked(4, 6, 2)
    assert verify(logits, [row(temperature=1.0, top_k=1)], [[4, 6]]).token_ids == [[4, 6, 2]]
    assert verify(logits, [row(temperature=1.0, top_k=1)], [[4, 5]]).token_ids == [[4, 6]]


CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
"""Pearson's chi-square at p = 0.001 by degrees of freedom: a correct sampler fails one check in 1,000 seeds."""


def assert_follows(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Counts drawn from probs (chi-square goodness of fit); no count where probs is 0."""
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * counts.sum()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_0_001[int(support.sum()) - 1], (counts, probs)


def test_sampled_tokens_keep_the_target_distribution():
    """Seeded: 10,000 sequences of drafts [x1, x2] on fixed logits, temperature 0.9, top-k 5, frequency penalty.
    The first emitted token follows p0; given it is x1, the second follows p1 (penalised for x1); given x1 x2, the
    third follows p2. Reference: the exact distributions and the plain sampler's frequencies."""
    vocab, num_seqs, rounds = 8, 1000, 10
    torch.manual_seed(3)
    base = torch.randn(3, vocab) * 1.5
    x1, x2 = int(base[0].argsort()[-2]), int(base[1].argsort()[-1])  # a likely but not the likeliest first draft
    settings = dict(temperature=0.9, top_k=5, frequency_penalty=0.7)
    logits = torch.cat([base[:1].expand(num_seqs, vocab), base[1:].repeat(num_seqs, 1)])  # the runner's layout
    first, second, third = (torch.zeros(vocab) for _ in range(3))
    for k in range(rounds):
        rows = [row(seed=k * num_seqs + i, **settings) for i in range(num_seqs)]
        out = verify(logits, rows, [[x1, x2]] * num_seqs)
        for tokens in out.token_ids:
            first[tokens[0]] += 1
            if len(tokens) > 1:
                second[tokens[1]] += 1
            if len(tokens) > 2:
                third[tokens[2]] += 1

    def exact(logits_row: torch.Tensor, generated: list[int]) -> torch.Tensor:
        x = logits_row.clone()
        for t in generated:
            x[t] -= 0.7
        x = x / 0.9
        x[x.argsort()[:-5]] = float("-inf")
        return torch.softmax(x, dim=-1)

    assert_follows(first, exact(base[0], []))
    assert second.sum() == first[x1] and second.sum() > 1200
    assert_follows(second, exact(base[1], [x1]))
    assert third.sum() == second[x2] and third.sum() > 250
    assert_follows(third, exact(base[2], [x1, x2]))
    plain = torch.zeros(vocab)
    for k in range(rounds):
        rows = [row(seed=(rounds + k) * num_seqs + i, **settings) for i in range(num_seqs)]  # other seeds
        for t in sample(base[:1].expand(num_seqs, vocab), rows).token_ids:
            plain[t] += 1
    # Two samples of the same distribution: 0.5 * sum |a - b| stays within a few times sqrt(support / n).
    assert 0.5 * float((first - plain).abs().sum()) / plain.sum() < 0.03
