"""Token sampling for one step: penalties, temperature, top-k / top-p / min-p, per-sequence seeded random numbers,
and log-probabilities of the model's raw distribution.

Each sequence that samples owns one row of ``logits`` [S, V]; a step is a fixed number of tensor ops whatever the
rows ask for, and one device-to-host copy of the sampled ids (no op per row: on a GPU, a loop of small ops per
request costs a kernel launch each). Random numbers come from a counter-based generator: the uniform a row uses is a
hash of its sequence's seed and its position (the number of tokens it has generated, and the draft index under
speculative decoding), computed for all rows at once on the logits' device. So a seeded request gives the same
tokens whatever else shares the batch, after a preemption, and on any device; and no generator state is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from loom.ops.cpp_extension import extension_if_built


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
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits."""
    allowed_token_ids: tuple[int, ...] = ()
    """The only ids that may be sampled; (): any."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, params) -> SamplingSettings:
        """The sampler's view of any object with these attributes (the engine's ``SamplingParams``)."""
        values = {f.name: getattr(params, f.name) for f in fields(cls)}
        values["logit_bias"] = tuple(sorted((values["logit_bias"] or {}).items()))
        values["allowed_token_ids"] = tuple(sorted(set(values["allowed_token_ids"] or ())))
        return cls(**values)


@dataclass(slots=True)
class SamplingRow:
    params: SamplingSettings
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int
    """The sequence's random seed (the request's seed + its index among n siblings, or one drawn by the engine)."""
    stop_ids: frozenset[int]
    """EOS and stop token ids, masked while fewer than min_tokens were generated."""
    num_pending: int = 0
    """Tokens the sequence sampled in a step whose ids are not read yet (async scheduling): they count in its
    position."""
    _arrays: list | None = field(default=None, init=False, repr=False, compare=False)
    """[prompt ids, output buffer, outputs in it]: ``token_arrays``' cache (``replace`` starts a new one)."""

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Prompt and output token ids as int64 arrays, for the penalties. The engine keeps one row per sequence, so
        the prompt is converted once and the outputs only by what was appended since the last step."""
        cache = self._arrays
        n = len(self.output_token_ids)
        if cache is None or n < cache[2]:
            cache = self._arrays = [np.asarray(self.prompt_token_ids, dtype=np.int64), np.empty(max(16, 2 * n),
                                                                                                  np.int64), 0]
        prompt, buffer, have = cache
        if n > have:
            if n > len(buffer):
                buffer = cache[1] = np.concatenate([buffer[:have], np.empty(2 * n - have, np.int64)])
            buffer[have:n] = self.output_token_ids[have:n]
            cache[2] = n
        return prompt, buffer[:n]

    @property
    def position(self) -> int:
        """Where the sequence is (tokens generated, read or pending): its uniforms are
        ``uniforms([seed], [position * MAX_DRAWS + j])``, and its stop ids are masked while this is below min_tokens."""
        return len(self.output_token_ids) + self.num_pending


MAX_DRAWS = 256
"""Uniforms a row may use in one step (1 for plain sampling, drafts + 1 under speculative decoding)."""


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    """Per row: the sampled token's and the top-k tokens' raw log-probabilities, when asked for."""


class DeferredSample:
    """A step's sampled ids (and log-probabilities) still on the device: ``result()`` reads them back.

    On CUDA the ids and the asked-for log-probabilities are copied into pinned host memory without blocking, behind
    an event, as soon as they are sampled, so ``result()`` waits for this step's sampling only, not for work queued on
    the stream after it (the next step's forward, under async scheduling). Until then ``tokens`` also feeds the next
    step's inputs on the device."""

    __slots__ = ("tokens", "_host", "_ready", "_want", "_tops", "_result")

    def __init__(self, tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, want: list[int], tops: list[int],
                 want_index: torch.Tensor | None = None):
        """``raw_logprobs``: the rows ``want`` of the model's log-softmax (``want_index``, on the device, when not
        every row), each asking for ``tops[i]`` top log-probabilities."""
        self.tokens = tokens
        """[S] int64 on the logits' device."""
        self._want, self._tops = want, tops
        parts = [tokens]
        if want:  # the sampled tokens' log-probabilities and the top ones, still on the device
            parts += _logprob_parts(raw_logprobs, tokens if want_index is None else tokens[want_index], max(tops))
        self._ready = None
        self._result: SampleResult | None = None
        if tokens.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            for host, t in zip(self._host, parts):
                host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = parts

    def result(self) -> SampleResult:
        if self._result is None:
            if self._ready is not None:
                self._ready.synchronize()
            token_list = self._host[0].tolist()
            logprobs: list[dict[int, float] | None] = [None] * len(token_list)
            if self._want:
                picked = [token_list[i] for i in self._want]
                for i, lp in zip(self._want, _logprob_dicts(picked, self._tops, *self._host[1:])):
                    logprobs[i] = lp
            self._result = SampleResult(token_list, logprobs)
            self._host = []
        return self._result


def to_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, a numpy array or a CPU tensor) as a tensor on ``device`` without making the host wait for
    the device.

    NOTE: ``torch.tensor(values, device=cuda)`` copies and then synchronizes the stream: the host waits for every
    kernel queued before the copy — under async scheduling, the next step's forward, which the host should be
    preparing the step after for. From pageable memory even a non-blocking copy may wait (CUDA stages it and "may
    synchronize with the stream"); from pinned memory it never does, and torch's pinned-memory pool keeps the
    block until the copy has run, so the temporary may be dropped at once."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """logits: [S, V] float32, one row per sampling sequence, in ``rows`` order."""
    return sample_deferred(logits, rows).result()


def sample_deferred(logits: torch.Tensor, rows: list[SamplingRow]) -> DeferredSample:
    """``sample`` without reading the ids back: they stay on the logits' device until ``result()``."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    # a list index would reach the device in a blocking copy (a wait for the stream): send it without one
    some = to_device(want, logits.device) if 0 < len(want) < len(rows) else None
    raw_logprobs = torch.log_softmax(logits if some is None else logits[some], dim=-1) if want else None
    logits = apply_penalties(logits, rows)
    ext = _cpu_extension(logits)
    tokens = sample_torch(logits, rows) if ext is None else ext.sample_rows(logits, *_row_settings(rows))
    return DeferredSample(tokens, raw_logprobs, want, [rows[i].params.logprobs for i in want], some)


def sample_torch(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Token ids [S] from penalised logits in tensor ops, on any device: argmax for greedy rows, the inverse CDF of
    ``random_probs`` for the others, chosen per row on the device (no index lists, no host sync: the settings travel
    in two tensors). On CPU, ``sample`` draws the same tokens with the C++ kernel instead (``_cpu_extension``)."""
    tokens = logits.argmax(dim=-1)
    if all(r.params.is_greedy for r in rows):
        return tokens
    floats, ints = _settings_tensors(rows, logits.device)
    greedy = floats[:, 0] == 0
    probs = _filtered_probs(logits, rows, floats, ints)
    sampled = inverse_cdf(probs, uniforms(ints[:, 1:2], ints[:, 2:3])[:, 0].to(probs.dtype))
    return torch.where(greedy, tokens, sampled)


def _settings_tensors(rows: list[SamplingRow], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, [temperature, top_p, min_p] (float32) and [top_k, seed, counter of draw 0] (int64), one copy each."""
    floats = to_device([[r.params.temperature, r.params.top_p, r.params.min_p] for r in rows], device, torch.float32)
    ints = to_device([[r.params.top_k, r.seed, r.position * MAX_DRAWS] for r in rows], device, torch.int64)
    return floats, ints


def _cpu_extension(logits: torch.Tensor):
    """Loom's C++ extension for float32 CPU logits, when it builds; None otherwise (the tensor ops serve).

    Its ``sample_rows`` draws what ``sample_torch`` draws in a few passes over each row, without sorting the
    vocabulary; ``filtered_probs`` and ``apply_penalties_`` are ``random_probs`` and the token penalties. Measured on
    2 Zen 4 cores, a 49,152-token vocabulary (``benchmarks/sampler.py``): temperature 1, 0.33 -> 0.06 ms for one row
    and 22 -> 3.5 ms for 128; top_p 0.9 on peaked logits, 5.2 -> 0.18 ms for one row and 305 -> 12 ms for 128."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    return extension_if_built()


def _row_settings(rows: list[SamplingRow]) -> tuple[torch.Tensor, ...]:
    """``sample_rows``' per-row arguments: temperature, top_p, min_p; top_k and the seed and counter of the row's
    uniform (draw 0 at its position, as ``row_uniforms``; the kernel hashes them as ``uniforms`` does)."""
    floats, ints = _settings_tensors(rows, "cpu")
    floats, ints = floats.T.contiguous(), ints.T.contiguous()
    return floats[0], floats[1], floats[2], ints[0], ints[1], ints[2]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """``allowed_token_ids``, ``logit_bias``, then repetition / presence / frequency penalties and the min_tokens mask
    of each row (a copy when any applies), in vLLM's order: the penalties scale the biased logits.

    The allowed ids and the biases of every row are each one indexed write (-inf over the rows that restrict, their
    allowed ids put back; the biases added at (row, id) pairs).

    The rows that need penalties are handled together: on CPU one C++ call walks each row's tokens (O(tokens), from
    arrays each ``SamplingRow`` keeps up to date); elsewhere their token ids go to the device as one padded tensor per
    kind and become [N, V] counts (``scatter_add``), as vLLM's bin counts do; no op runs per row. The min_tokens mask is
    one indexed write of -inf at the stop ids of the rows still short of their minimum (no [N, V] work: with
    min_tokens alone, as a benchmark's fixed-length requests ask, the counts cost ~0.3 ms, ~4% of a SmolLM2 Q4_1
    decode step)."""
    needs = [i for i, r in enumerate(rows) if _has_penalty(r)]
    if not needs:
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[-1]
    _apply_allowed_and_bias(logits, [(i, rows[i].params) for i in needs])
    penalised = [i for i in needs if has_token_penalty(rows[i].params)]
    ext = _cpu_extension(logits) if penalised else None
    if ext is not None:
        _penalties_cpu(ext, logits, penalised, rows)
    elif penalised:
        index = to_device(penalised, device)  # a list index would be uploaded from pageable memory: a stream sync
        sub = logits.index_select(0, index)
        params = [rows[i].params for i in penalised]
        outputs = _counts([rows[i].token_arrays()[1] for i in penalised], vocab, device)  # [N, V] float
        rep = to_device([p.repetition_penalty for p in params], device, logits.dtype)[:, None]
        if any(p.repetition_penalty != 1.0 for p in params):  # decided on the host: no wait on the device
            seen = (outputs + _counts([rows[i].token_arrays()[0] for i in penalised], vocab, device)) > 0
            scaled = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen & (rep != 1.0), scaled, sub)
        freq = to_device([p.frequency_penalty for p in params], device, logits.dtype)[:, None]
        presence = to_device([p.presence_penalty for p in params], device, logits.dtype)[:, None]
        logits.index_copy_(0, index, sub - freq * outputs - presence * (outputs > 0).to(logits.dtype))
    masked = [(i, t) for i in needs if rows[i].position < rows[i].params.min_tokens
              for t in rows[i].stop_ids if 0 <= t < vocab]
    if masked:
        row_ids, token_ids = zip(*masked)
        logits[to_device(row_ids, device), to_device(token_ids, device)] = float("-inf")
    return logits


def _apply_allowed_and_bias(logits: torch.Tensor, needs: list[tuple[int, SamplingSettings]]) -> None:
    """In place: -inf outside each restricting row's ``allowed_token_ids``, then its ``logit_bias`` added."""
    device = logits.device
    allowed = [(i, p.allowed_token_ids) for i, p in needs if p.allowed_token_ids]
    if allowed:
        restricted = to_device([i for i, _ in allowed], device)
        ids_of = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in allowed])
        rows_of = np.repeat(np.arange(len(allowed)), [len(ids) for _, ids in allowed])
        mask = torch.full((len(allowed), logits.shape[-1]), float("-inf"), device=device, dtype=logits.dtype)
        mask[to_device(rows_of, device), to_device(ids_of, device)] = 0.0
        logits.index_add_(0, restricted, mask)
    biased = [(i, t, b) for i, p in needs for t, b in p.logit_bias]
    if biased:
        rows_of, ids_of, values = zip(*biased)
        logits.index_put_((to_device(rows_of, device), to_device(ids_of, device)),
                          to_device(values, device, logits.dtype), accumulate=True)


def _counts(token_lists: list[np.ndarray], vocab: int, device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each token id occurs in each array (one padded upload)."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    if width:
        padded = np.full((len(token_lists), width), vocab, dtype=np.int64)
        for row, tokens in zip(padded, token_lists):
            row[: len(tokens)] = tokens
        padded = to_device(padded, device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _penalties_cpu(ext, logits: torch.Tensor, penalised: list[int], rows: list[SamplingRow]) -> None:
    """The token penalties of rows ``penalised`` in place, by the C++ kernel: O(tokens) a row, no [N, V] counts."""
    arrays = [rows[i].token_arrays() for i in penalised]
    params = [rows[i].params for i in penalised]

    def flat(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, np.int64)), torch.from_numpy(offsets)

    floats = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                          dtype=torch.float32).T.contiguous()
    ext.apply_penalties_(logits, torch.tensor(penalised, dtype=torch.int64), *flat([a[0] for a in arrays]),
                         *flat([a[1] for a in arrays]), floats[0], floats[1], floats[2])


def _has_penalty(r: SamplingRow) -> bool:
    p = r.params
    return has_token_penalty(p) or r.position < p.min_tokens or bool(p.logit_bias or p.allowed_token_ids)


def has_token_penalty(p: SamplingSettings) -> bool:
    """A repetition, presence or frequency penalty (what needs the token counts)."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def row_uniforms(rows: list[SamplingRow], draws: int, device, dtype=torch.float32) -> torch.Tensor:
    """[R, draws] uniforms in [0, 1): row r's draw j is the hash of (seed, position * MAX_DRAWS + j)."""
    if draws > MAX_DRAWS:
        raise ValueError(f"at most {MAX_DRAWS} random draws per row and step, asked for {draws}")
    keys = to_device([[r.seed, r.position] for r in rows], device, torch.int64)  # one upload
    counters = keys[:, 1:] * MAX_DRAWS + torch.arange(draws, device=device)[None, :]
    return uniforms(keys[:, :1], counters).to(dtype)


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64, as in C on uint64)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1) (float32, 24 random bits): ``splitmix64(splitmix64(seed) ^ counter)`` for each
    (seed, counter) pair, broadcast; int64 tensors on any device."""
    bits = _splitmix64(_splitmix64(seeds) ^ counters)
    return _shift_right(bits, 40).to(torch.float32) * (1.0 / (1 << 24))


def random_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: [R, V] (penalties applied) -> the distributions sampled from [R, V]: temperature, top-k / top-p,
    then min-p. Rows are not renormalised after min-p (``inverse_cdf`` scales by each row's total). On CPU the C++
    kernel computes them without sorting (as ``sample`` draws)."""
    ext = _cpu_extension(logits)
    if ext is not None:
        temperature, top_p, min_p, top_k, *_ = _row_settings(rows)
        return ext.filtered_probs(logits, temperature, top_p, min_p, top_k)
    return random_probs_torch(logits, rows)


def random_probs_torch(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """``random_probs`` in tensor ops (any device; a full sort for top-k / top-p)."""
    floats, ints = _settings_tensors(rows, logits.device)
    return _filtered_probs(logits, rows, floats, ints)


def _filtered_probs(logits: torch.Tensor, rows: list[SamplingRow], floats: torch.Tensor,
                    ints: torch.Tensor) -> torch.Tensor:
    """``random_probs`` from ``_settings_tensors``; which filters run is decided from ``rows`` on the host, so nothing
    waits for the device. A greedy row (temperature 0) is scaled by 1 here; its token is the argmax anyway."""
    temps = floats[:, 0]
    x = logits / torch.where(temps == 0, 1.0, temps).to(logits.dtype)[:, None]
    if any(0 < r.params.top_k < logits.shape[-1] or r.params.top_p < 1.0 for r in rows):
        x = _top_k_top_p(x, ints[:, 0], floats[:, 1])
    probs = torch.softmax(x, dim=-1)
    if any(r.params.min_p > 0 for r in rows):
        min_p = floats[:, 2].to(probs.dtype)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: [R, V] non-negative (any total), u: [R] uniform in [0, 1) -> one token id per row [R]."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _top_k_top_p(x: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """x: [R, V]; top_k, top_p: per row (lists or tensors; top_k <= 0 or >= V is off). Drops what the sorted walk
    drops: ranks past k, then tokens with more than top_p of the (top-k) mass ranked above them."""
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    k = torch.as_tensor(top_k, device=x.device)
    k = torch.where((k > 0) & (k < vocab), k, vocab)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    p = torch.as_tensor(top_p, device=x.device, dtype=x.dtype)[:, None]
    drop |= (before > p) & (p < 1.0)  # top_p 1 is off: a float cumsum may pass 1.0 in the tail and drop tokens
    drop[:, 0] = False  # the most likely token always survives
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def gather_logprobs(row: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """One row's raw log-probabilities: the token's, then the ``top`` most likely (``batch_logprobs`` for many)."""
    return batch_logprobs(row[None], [token], [top])[0]


def batch_logprobs(logprobs: torch.Tensor, tokens: list[int], tops: list[int]) -> list[dict[int, float]]:
    """logprobs: [R, V] raw log-probabilities -> per row {token: lp, then its ``tops[r]`` most likely tokens}, in two
    device-to-host copies for all rows (not two per row). A -inf entry (a grammar-masked token, when fewer tokens
    are allowed than asked for) is left out of the top ones."""
    parts = _logprob_parts(logprobs, torch.tensor(tokens, device=logprobs.device), max(tops, default=0))
    return _logprob_dicts(tokens, tops, *(t.cpu() for t in parts))


def _logprob_parts(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    """On the device: [R] the tokens' log-probabilities, then (when k) [R, k] the top values and [R, k] their ids."""
    parts = [logprobs.gather(1, tokens[:, None])[:, 0]]
    if k:
        parts += list(logprobs.topk(k, dim=-1))
    return parts


def _logprob_dicts(tokens: list[int], tops: list[int], chosen: torch.Tensor, values: torch.Tensor | None = None,
                   ids: torch.Tensor | None = None) -> list[dict[int, float]]:
    """``_logprob_parts`` read back (host tensors) -> the per-row dicts of ``batch_logprobs``."""
    chosen_list = chosen.tolist()
    if values is not None:
        value_rows, id_rows = values.tolist(), ids.tolist()
    out = []
    for r, (token, top) in enumerate(zip(tokens, tops)):
        result = {token: chosen_list[r]}
        for tid, lp in zip(id_rows[r][:top], value_rows[r][:top]) if top else ():
            if lp != float("-inf"):
                result.setdefault(tid, lp)
        out.append(result)
    return out
