"""Verifying draft tokens (speculative decoding) against the model's own distributions, for a whole step at once.

A sequence with d draft tokens x_1..x_d owns d + 1 logits rows: row j is the model's distribution of the token
after the sequence and x_1..x_j. Greedy sequences accept drafts while each equals its row's argmax, then emit the
next row's argmax (the correction, or a bonus token once all d are accepted): exactly greedy decoding. Sampled
sequences use rejection sampling for a deterministic proposal (a one-hot q): x_j is accepted with probability
p_j(x_j) under the row's processed distribution p_j (penalties, temperature, top-k, top-p, min-p, as ``sample``
builds it); at the first rejection the token is drawn from p_j without x_j, renormalised (the residual
max(p - q, 0)); after d acceptances a bonus token is drawn from p_d. Every emitted token is then distributed exactly
as if sampled one step at a time (Leviathan et al. 2023, Chen et al. 2023).

Penalties and min_tokens see the drafts before a row as generated tokens, so row j is processed as the plain
sampler would process it once x_1..x_j were accepted. A sequence without drafts reduces to ``sample``: one uniform
number (draw 0 at its position), the same distribution, the same token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loom.ops.sampler import SamplingRow, apply_penalties, gather_logprobs, inverse_cdf, random_probs, row_uniforms


@dataclass(slots=True)
class VerifyResult:
    token_ids: list[list[int]]
    """Per sequence, the tokens to append in order: its accepted drafts, then one sampled token (1..d + 1)."""
    logprobs: list[list[dict[int, float] | None]]
    """Per sequence and emitted token: raw log-probabilities where asked for (as ``sample`` gives them), else None."""
    num_accepted: list[int]


def verify(logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]]) -> VerifyResult:
    """logits: [S + D, V] float32: row i < S is sequence i's row 0; then the d_i draft rows of each sequence in turn
    (the model runner's layout). rows: one per sequence; drafts: per sequence, possibly empty."""
    index = row_index(drafts)
    expanded = _rows_per_logit(rows, drafts)
    processed = apply_penalties(logits, expanded)
    tokens: list[list[int]] = [[] for _ in rows]
    accepted = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    if greedy:
        _verify_greedy(processed, drafts, index, greedy, tokens, accepted)
    if len(greedy) < len(rows):
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        _verify_sampled(processed, expanded, drafts, index, sampled, tokens, accepted)
    return VerifyResult(tokens, _logprobs(logits, rows, index, tokens), accepted)


def row_index(drafts: list[list[int]]) -> list[list[int]]:
    """Per sequence, its logits rows in order (row 0, then one per draft token)."""
    index, row = [], len(drafts)
    for i, d in enumerate(drafts):
        index.append([i, *range(row, row + len(d))])
        row += len(d)
    return index


def _rows_per_logit(rows: list[SamplingRow], drafts: list[list[int]]) -> list[SamplingRow]:
    """One SamplingRow per logits row: draft row j of a sequence sees x_1..x_j as generated tokens."""
    flat = list(rows)
    for r, d in zip(rows, drafts):
        flat.extend(replace(r, output_token_ids=r.output_token_ids + d[:j]) for j in range(1, len(d) + 1))
    return flat


def _verify_greedy(processed, drafts, index, seqs, tokens, accepted) -> None:
    flat = [r for i in seqs for r in index[i]]
    argmax = dict(zip(flat, processed[flat].argmax(dim=-1).tolist()))
    for i in seqs:
        targets = [argmax[r] for r in index[i]]
        a = 0
        while a < len(drafts[i]) and drafts[i][a] == targets[a]:
            a += 1
        tokens[i], accepted[i] = drafts[i][:a] + [targets[a]], a


def _verify_sampled(processed, expanded, drafts, index, seqs, tokens, accepted) -> None:
    flat = [r for i in seqs for r in index[i]]
    pos = {r: k for k, r in enumerate(flat)}
    probs = random_probs(processed[flat], [expanded[r] for r in flat])  # [R, V], rows not renormalised
    p_draft = _draft_probs(probs, [[pos[r] for r in index[i][:-1]] for i in seqs], [drafts[i] for i in seqs])
    final_pos, excluded, final_u = [], [], []
    # One uniform per draft (accept if u < p(x)) and one for the token drawn after: draws 0..d at the row's position.
    width = max(len(drafts[i]) for i in seqs) + 1
    all_u = row_uniforms([expanded[i] for i in seqs], width, probs.device, torch.float64).tolist()
    for k, i in enumerate(seqs):
        d = len(drafts[i])
        u = all_u[k][: d + 1]
        a = 0
        while a < d and u[a] < p_draft[k][a]:
            a += 1
        final_pos.append(pos[index[i][a]])
        excluded.append(drafts[i][a] if a < d else -1)
        final_u.append(u[d])
        tokens[i], accepted[i] = drafts[i][:a], a
    drawn = _draw_residual(probs[final_pos], excluded, torch.tensor(final_u, dtype=probs.dtype, device=probs.device))
    for i, t in zip(seqs, drawn):
        tokens[i].append(t)


def _draft_probs(probs: torch.Tensor, positions: list[list[int]], drafts: list[list[int]]) -> list[list[float]]:
    """Normalised probability of each draft token under its own row: [[p_1(x_1), ..., p_d(x_d)] per sequence]."""
    flat_pos = [p for ps in positions for p in ps]
    if not flat_pos:
        return [[] for _ in drafts]
    flat_tok = [t for d in drafts for t in d]
    values = (probs[flat_pos, flat_tok] / probs[flat_pos].sum(dim=-1)).tolist()
    out, start = [], 0
    for d in drafts:
        out.append(values[start : start + len(d)])
        start += len(d)
    return out


def _draw_residual(probs: torch.Tensor, excluded: list[int], u: torch.Tensor) -> list[int]:
    """probs: [C, V] (a copy) -> one token per row, drawn with ``excluded`` (the rejected draft; -1: none) removed.

    NOTE: a rejected draft that held all of its row's mass (rejected only through rounding) leaves nothing to draw
    from; it is emitted itself, which is what the exact distribution would do."""
    rows = [k for k, x in enumerate(excluded) if x >= 0]
    if rows:
        probs[rows, [excluded[k] for k in rows]] = 0.0
    drawn = inverse_cdf(probs, u).tolist()
    empty = (probs.sum(dim=-1) <= 0).tolist()
    return [excluded[k] if empty[k] and excluded[k] >= 0 else t for k, t in enumerate(drawn)]


def _logprobs(logits, rows, index, tokens) -> list[list[dict[int, float] | None]]:
    """Raw log-probabilities of each emitted token under its own row (the row it was accepted or drawn at)."""
    out: list[list[dict[int, float] | None]] = [[None] * len(t) for t in tokens]
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return out
    flat = [r for i in want for r in index[i][: len(tokens[i])]]
    raw = dict(zip(flat, torch.log_softmax(logits[flat], dim=-1)))
    for i in want:
        out[i] = [gather_logprobs(raw[r], t, rows[i].params.logprobs) for r, t in zip(index[i], tokens[i])]
    return out
