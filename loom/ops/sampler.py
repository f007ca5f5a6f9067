"""Token sampling for one step: penalties, temperature, top-k / top-p / min-p, per-sequence seeded generators,
and log-probabilities of the model's raw distribution.

Each sequence that samples owns one row of ``logits`` [S, V]. Rows with a seed draw from their own
``torch.Generator`` only, so a seeded request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """What the sampler reads of a request's sampling parameters, as plain values (the engine copies them in)."""

    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    """Top log-probabilities to return (0: only the sampled token's); None: none."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, params) -> SamplingSettings:
        """The sampler's view of any object with these attributes (the engine's ``SamplingParams``)."""
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls)})


@dataclass(slots=True)
class SamplingRow:
    params: SamplingSettings
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator
    stop_ids: frozenset[int]
    """EOS and stop token ids, masked while fewer than min_tokens were generated."""


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    """Per row: the sampled token's and the top-k tokens' raw log-probabilities, when asked for."""


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """logits: [S, V] float32, one row per sampling sequence, in ``rows`` order."""
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    logits = apply_penalties(logits, rows)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if random_rows:
        tokens[random_rows] = _sample_random(logits[random_rows], [rows[i] for i in random_rows])
    token_list = tokens.tolist()
    logprobs = [
        gather_logprobs(raw_logprobs[i], token_list[i], rows[i].params.logprobs) if want else None
        for i, want in enumerate(want_logprobs)
    ]
    return SampleResult(token_list, logprobs)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition / presence / frequency penalties and the min_tokens mask of each row (a copy when any applies)."""
    needs = [i for i, r in enumerate(rows) if _has_penalty(r)]
    if not needs:
        return logits
    logits = logits.clone()
    device = logits.device
    for i in needs:
        r, p = rows[i], rows[i].params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), device=device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            ids, counts = torch.tensor(r.output_token_ids, device=device).unique(return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
        if len(r.output_token_ids) < p.min_tokens and r.stop_ids:
            logits[i, list(r.stop_ids)] = float("-inf")
    return logits


def _has_penalty(r: SamplingRow) -> bool:
    p = r.params
    return (
        p.repetition_penalty != 1.0
        or bool(p.presence_penalty or p.frequency_penalty)
        or len(r.output_token_ids) < p.min_tokens
    )


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: [R, V] -> sampled ids [R]. One uniform number per row, from that row's own generator."""
    u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in rows])
    return inverse_cdf(random_probs(logits, rows), u)


def random_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: [R, V] (penalties applied) -> the distributions sampled from [R, V]: temperature, top-k / top-p,
    then min-p. Rows are not renormalised after min-p (``inverse_cdf`` scales by each row's total)."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    x = logits / temps[:, None]
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        x = _top_k_top_p(x, top_k, top_p)
    probs = torch.softmax(x, dim=-1)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device, dtype=probs.dtype)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: [R, V] non-negative (any total), u: [R] uniform in [0, 1) -> one token id per row [R]."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=x.device)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    drop |= before > torch.tensor(top_p, device=x.device, dtype=x.dtype)[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def gather_logprobs(row: torch.Tensor, token: int, top: int) -> dict[int, float]:
    result = {token: float(row[token])}
    if top:
        values, ids = row.topk(top)
        for tid, lp in zip(ids.tolist(), values.tolist()):
            if lp != float("-inf"):  # a grammar-masked token (fewer allowed tokens than asked for)
                result.setdefault(tid, lp)
    return result
