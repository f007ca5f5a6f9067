"""Sampler against plain-PyTorch references: penalties, top-k / top-p / min-p, greedy, distribution."""

from __future__ import annotations

import pytest
import torch

from loom.ops import sampler
from loom.ops.sampler import SamplingRow, SamplingSettings, sample


def row(output=(), prompt=(1,), seed=0, stop_ids=frozenset(), **params) -> SamplingRow:
    return SamplingRow(SamplingSettings(**params), list(prompt), list(output), seed, stop_ids)


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


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "tensor-ops"])
def test_allowed_ids_and_logit_bias_come_before_the_penalties_as_in_vllm(kernel, monkeypatch):
    """Per row: -inf outside allowed_token_ids, the bias added, then the repetition penalty scales the biased logit
    (vLLM applies allowed ids and logit_bias before penalties); rows without either are left as they are."""
    if not kernel:
        monkeypatch.setattr(sampler, "_cpu_extension", lambda logits: None)
    torch.manual_seed(3)
    logits = torch.randn(4, 20) * 3
    rows = [row(logit_bias=((2, 5.0), (9, -100.0))),
            row(allowed_token_ids=(1, 4, 7)),
            row(output=[4, 4], allowed_token_ids=(4, 6), logit_bias=((4, 2.5), (6, -1.0), (8, 30.0)),
                repetition_penalty=1.5),
            row()]
    got = sampler.apply_penalties(logits, rows)
    ref = logits.clone()
    ref[0, 2] += 5.0
    ref[0, 9] -= 100.0
    ref[1, [t for t in range(20) if t not in (1, 4, 7)]] = float("-inf")
    ref[2, [t for t in range(20) if t not in (4, 6)]] = float("-inf")
    ref[2, 4] += 2.5
    ref[2, 6] -= 1.0
    for t in (1, 4):  # the prompt's and the output's tokens: the penalty on the biased logit (8 stays -inf)
        ref[2, t] = ref[2, t] / 1.5 if ref[2, t] > 0 else ref[2, t] * 1.5
    torch.testing.assert_close(got, ref)
    assert torch.equal(got[3], logits[3])
    greedy = sample(logits[:3], [row(temperature=0, allowed_token_ids=(11, 12)),
                                 row(temperature=0, logit_bias=((5, 100.0),)),
                                 row(temperature=0.7, seed=4, allowed_token_ids=(3,))])
    assert greedy.token_ids == [11 + int(logits[0, 12] > logits[0, 11]), 5, 3]


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
    rows = [row(seed=7 + i, temperature=1.0) for i in range(8000)]  # 8000 sequences in one step
    counts = torch.bincount(torch.tensor(sample(logits.expand(8000, 30), rows).token_ids), minlength=30)
    assert (counts / 8000 - torch.softmax(logits[0], -1)).abs().max() < 0.02


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits, [row(seed=s, temperature=1.0, min_p=0.2)]).token_ids[0] for s in range(500)}
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


MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """SplitMix64's finaliser on Python integers modulo 2**64 (Steele, Lea and Flood 2014; Vigna's reference C)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_uniforms_equal_the_unsigned_64_bit_reference():
    seeds = [0, 1, 7, 2**31 - 1, 2**62 + 12345, 2**63 - 1]
    counters = [0, 1, 255, 256, 2**40 + 3]
    got = sampler.uniforms(torch.tensor(seeds)[:, None], torch.tensor(counters)[None, :])
    for i, s in enumerate(seeds):
        for j, c in enumerate(counters):
            bits = splitmix64_reference(splitmix64_reference(s) ^ c)
            assert float(got[i, j]) == (bits >> 40) / 2**24


def test_uniforms_are_uniform_and_uncorrelated():
    u = sampler.uniforms(torch.arange(200)[:, None], torch.arange(1000)[None, :]).flatten()  # 200 seeds x 1000 draws
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.bincount((u * 16).long(), minlength=16).double()
    chi2 = float(((counts - len(u) / 16) ** 2 / (len(u) / 16)).sum())
    assert chi2 < 37.70  # chi-square, 15 degrees of freedom, p = 0.001
    rows = u.view(200, 1000) - 0.5
    lag1 = float((rows[:, 1:] * rows[:, :-1]).mean() / rows.pow(2).mean())
    across = float((rows[1:] * rows[:-1]).mean() / rows.pow(2).mean())  # neighbouring seeds, same position
    assert abs(lag1) < 0.01 and abs(across) < 0.01


def test_a_seeded_row_draws_the_same_token_whatever_shares_the_step():
    torch.manual_seed(4)
    logits = torch.randn(6, 100)
    alone = [sample(logits[i : i + 1], [row(seed=40 + i, output=[1] * i, temperature=0.9)]).token_ids[0]
             for i in range(6)]
    together = sample(logits, [row(seed=40 + i, output=[1] * i, temperature=0.9) for i in range(6)]).token_ids
    assert together == alone
    # the next position draws a fresh number: over 50 positions one seed does not repeat one token
    drawn = {sample(logits[:1], [row(seed=3, output=[1] * n, temperature=1.0)]).token_ids[0] for n in range(50)}
    assert len(drawn) > 5


@pytest.mark.parametrize("path", ["kernel", "tensors"])
def test_penalties_of_many_rows_at_once_match_each_row_alone(path, monkeypatch):
    """Rows with different penalty kinds (and none) in one step equal the reference formulas row by row, through the
    C++ kernel (CPU float32) and through the tensor ops every other device runs."""
    if path == "tensors":
        monkeypatch.setattr(sampler, "_cpu_extension", lambda logits: None)
    torch.manual_seed(5)
    logits = torch.randn(6, 30) * 3
    rows = [
        row(output=[3, 3, 7], prompt=[5, 7], repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        row(output=[], prompt=[1]),
        row(output=[2, 9, 9, 9], prompt=[2], frequency_penalty=-0.5, min_tokens=6, stop_ids=frozenset({0, 11})),
        row(output=[4], prompt=[8, 8, 4], repetition_penalty=0.7),
        row(output=[5], prompt=[3], min_tokens=3, stop_ids=frozenset({2, 6, 29})),  # the mask alone, no counts
        row(output=[1, 1, 1], min_tokens=2, stop_ids=frozenset({4})),  # its minimum reached: untouched
    ]
    got = sampler.apply_penalties(logits, rows)
    ref = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for t in set(r.prompt_token_ids) | set(r.output_token_ids):
            if p.repetition_penalty != 1.0:
                ref[i, t] = ref[i, t] / p.repetition_penalty if ref[i, t] > 0 else ref[i, t] * p.repetition_penalty
        for t in set(r.output_token_ids):
            ref[i, t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
        if len(r.output_token_ids) < p.min_tokens:
            ref[i, sorted(r.stop_ids)] = float("-inf")
    torch.testing.assert_close(got, ref)
    assert got.data_ptr() != logits.data_ptr() and torch.equal(got[1], logits[1]) and torch.equal(got[5], logits[5])


# --- the C++ kernel (sample_rows) against the tensor ops ------------------------------------------------------------
SETTINGS = [
    dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, top_p=0.5, top_k=50), dict(temperature=0.8, min_p=0.1), dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.0), dict(temperature=2.0, top_k=20, top_p=0.7, min_p=0.05),
    dict(temperature=1e-3, top_p=0.95), dict(temperature=1.0, top_k=-1, top_p=1.0),
]


def reference_cdf_gap(logits_row: torch.Tensor, r: SamplingRow, u: float) -> float:
    """How far the row's draw target lies from the nearest step of the reference CDF, relative to its total."""
    probs = sampler.random_probs_torch(logits_row[None], [r])[0].double()
    cdf = probs.cumsum(0)
    return float((cdf - u * cdf[-1]).abs().min() / cdf[-1])


def kernel_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    ext = sampler._cpu_extension(logits)
    assert ext is not None, "the C++ sampler did not build"
    return ext.sample_rows(logits, *sampler._row_settings(rows)).tolist()


def test_the_cpu_kernel_draws_the_tokens_the_tensor_ops_draw():
    """Every setting, many seeds and positions, peaked and flat rows: the kernel's token equals ``sample_torch``'s,
    except where the uniform falls within float rounding of a step of the reference CDF (sums in another order)."""
    torch.manual_seed(6)
    vocab = 3000
    scales = [0.5, 2.0, 8.0]  # flat to peaked
    rows, logit_rows = [], []
    for i in range(330):
        rows.append(row(seed=1000 + i, output=[1] * (i % 7), **SETTINGS[i % len(SETTINGS)]))
        logit_rows.append(torch.randn(vocab) * scales[i % len(scales)])
    logits = torch.stack(logit_rows)
    got = kernel_tokens(logits, rows)
    want = sampler.sample_torch(logits, rows).tolist()
    u = sampler.row_uniforms(rows, 1, "cpu")[:, 0].tolist()
    differ = [i for i in range(len(rows)) if got[i] != want[i]]
    assert all(reference_cdf_gap(logits[i], rows[i], u[i]) < 1e-5 for i in differ), differ
    assert len(differ) <= 2
    assert sample(logits, rows).token_ids == got  # sample() takes the kernel on CPU


def test_the_cpu_kernel_keeps_exactly_the_reference_set():
    """20,000 rows of one distribution with their own seeds: the tokens drawn are kept ones, every kept token of
    probability >= 1e-3 is drawn, and the frequencies follow the reference's distribution."""
    torch.manual_seed(7)
    n, vocab = 20000, 400
    logits = (torch.randn(1, vocab) * 3).expand(n, -1).contiguous()
    for settings in SETTINGS[2:6] + SETTINGS[8:9]:
        rows = [row(seed=s, **settings) for s in range(n)]
        probs = sampler.random_probs_torch(logits[:1], rows[:1])[0].double()
        probs /= probs.sum()
        got = kernel_tokens(logits, rows)
        counts = torch.bincount(torch.tensor(got), minlength=vocab).double() / n
        kept = set(probs.nonzero().flatten().tolist())
        assert set(got) <= kept, settings
        assert {t for t in kept if probs[t] >= 1e-3} <= set(got), settings
        assert (counts - probs).abs().max() < 0.015, settings


def test_the_cpu_kernel_never_draws_a_masked_token_and_breaks_ties_as_argmax():
    logits = torch.full((4, 300), float("-inf"))
    logits[0, 17] = 0.0  # one allowed token
    logits[1, [5, 250]] = torch.tensor([1.0, 1.0])  # two, equally likely
    logits[2, [3, 9, 40]] = 2.5  # a greedy row with a three-way tie: the first index, as torch.argmax
    logits[3, 100:200] = torch.linspace(-5, 5, 100)
    rows = [row(seed=s, temperature=t, top_p=p) for s, t, p in [(1, 1.0, 1.0), (2, 1.0, 0.9), (3, 0.0, 1.0),
                                                                (4, 1.0, 1.0)]]
    for position in range(200):
        for r in rows:
            r.output_token_ids = [0] * position
        got = kernel_tokens(logits, rows)
        assert got[0] == 17 and got[1] in (5, 250) and got[2] == 3 and 100 <= got[3] < 200
        assert got[2] == int(logits[2].argmax())


def test_logprobs_of_many_rows_come_out_per_row_as_each_asked():
    """Rows asking for 0, 1 and 5 top log-probabilities and one asking for none, in one step (two copies to the
    host for all of them): each gets its sampled token's raw log-probability and exactly its own top ones."""
    torch.manual_seed(8)
    logits = torch.randn(4, 40) * 2
    rows = [row(temperature=0, logprobs=0), row(seed=3, temperature=1.0, logprobs=5), row(temperature=0),
            row(seed=4, temperature=0.7, logprobs=1, repetition_penalty=1.5, prompt=[int(logits[3].argmax())])]
    res = sample(logits, rows)
    assert res.logprobs[2] is None
    for i, top in ((0, 0), (1, 5), (3, 1)):
        lp = torch.log_softmax(logits[i], -1)
        token = res.token_ids[i]
        expected = {token: float(lp[token]), **{t: float(lp[t]) for t in lp.topk(top).indices.tolist()}}
        assert res.logprobs[i].keys() == expected.keys() and next(iter(res.logprobs[i])) == token
        assert all(abs(res.logprobs[i][t] - v) < 1e-6 for t, v in expected.items())


def test_the_cpu_kernel_gives_the_reference_distributions():
    """``random_probs`` on CPU (the C++ ``filtered_probs``, what speculative decoding's verification reads) equals the
    tensor ops' distributions: the same tokens kept, the same probabilities; greedy rows taken at temperature 1."""
    torch.manual_seed(9)
    logits = torch.randn(len(SETTINGS) * 3, 500) * torch.tensor([0.5, 2.0, 8.0]).repeat(len(SETTINGS))[:, None]
    logits[0, :250] = float("-inf")  # a masked half
    rows = [row(seed=i, **SETTINGS[i // 3]) for i in range(len(logits))]
    got = sampler.random_probs(logits, rows)
    want = sampler.random_probs_torch(logits, rows)
    # the same tokens kept (below 1e-30 exp's underflow differs: the kernel floors at e^-87.3, torch's may give 0)
    assert torch.equal(got > 1e-30, want > 1e-30)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_penalties_through_the_kernel_and_the_tensor_ops_agree(monkeypatch):
    """CPU logits take the C++ kernel; the tensor ops (a GPU's path) give the same logits on the same rows, long
    prompts and outputs with repeats, ids the penalties never touch left as they were."""
    torch.manual_seed(10)
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 300) * 3
    rows = [row(output=torch.randint(0, 300, (n,), generator=gen).tolist(),
                prompt=torch.randint(0, 300, (m,), generator=gen).tolist(), **kw)
            for n, m, kw in [(40, 120, dict(repetition_penalty=1.2)), (0, 50, dict(repetition_penalty=0.8)),
                             (200, 10, dict(frequency_penalty=0.3, presence_penalty=0.1)), (5, 5, dict()),
                             (60, 60, dict(repetition_penalty=1.1, frequency_penalty=-0.2, presence_penalty=0.4))]]
    kernel = sampler.apply_penalties(logits, rows)
    monkeypatch.setattr(sampler, "_cpu_extension", lambda logits: None)
    tensors = sampler.apply_penalties(logits, rows)
    torch.testing.assert_close(kernel, tensors)
    assert torch.equal(kernel[3], logits[3]) and not torch.equal(kernel[0], logits[0])


def test_a_rows_token_arrays_follow_its_lists():
    r = row(output=[5, 6], prompt=[1, 2, 3])
    prompt, output = r.token_arrays()
    assert prompt.tolist() == [1, 2, 3] and output.tolist() == [5, 6]
    for t in range(7, 60):  # grows past its buffer
        r.output_token_ids.append(t)
        assert r.token_arrays()[1].tolist() == [5, 6, *range(7, t + 1)]
    drafted = __import__("dataclasses").replace(r, output_token_ids=r.output_token_ids + [99])
    assert drafted.token_arrays()[1].tolist()[-2:] == [59, 99] and r.token_arrays()[1].tolist()[-1] == 59
