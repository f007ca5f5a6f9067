"""What the engine returns, in vLLM's shape: ``RequestOutput`` with one ``CompletionOutput`` per completion."""

from __future__ import annotations

from dataclasses import dataclass, field


class Logprob(float):
    """One log-probability as vLLM's offline API gives it (``.logprob``, ``.rank``: 1 for the most likely token, None
    where the top-k asked for do not tell; ``.decoded_token``, decoded when first read), and still the float itself,
    so arithmetic and JSON take it as one. ``LLM.generate`` and ``LLM.chat`` return these; the engine and the server
    carry plain floats."""

    __slots__ = ("rank", "_token", "_decode", "_text")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None,
                token: int | None = None, decode=None) -> Logprob:
        """``decoded_token``, or ``token`` and ``decode`` (token id -> text) to decode it when it is read: most
        callers never read it, and a long prompt's logprobs would otherwise cost a decode per entry."""
        self = super().__new__(cls, logprob)
        self.rank, self._text, self._token, self._decode = rank, decoded_token, token, decode
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    @property
    def decoded_token(self) -> str | None:
        if self._text is None and self._decode is not None:
            self._text, self._decode = self._decode(self._token), None
        return self._text

    def __reduce__(self):
        return Logprob, (float(self), self.rank, self.decoded_token)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"


def logprob_objects(entries: dict[int, float], top_k: int, decode, rank: int | None = None) -> dict[int, Logprob]:
    """A position's {token id: log-probability} (its own token first, then the ``top_k`` most likely, which the own
    token may be one of) as ``Logprob`` objects. A token's rank is 1 + how many of those listed are more likely, when
    the own token is among the top k (or ``rank`` gives the own token's, as prompt logprobs do); the own token's is
    None otherwise (it ranks below the k listed)."""
    items = list(entries.items())
    own_listed = len(items) <= top_k  # no extra entry: the own token is one of the top k
    out = {}
    for i, (token, value) in enumerate(items):
        known = rank if i == 0 and rank is not None else None
        if known is None and (i > 0 or own_listed):
            known = 1 + sum(other > value for _, other in items)
        out[token] = Logprob(value, known, token=token, decode=decode)
    return out


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    """Per generated token: {token id: log-probability}; the sampled token first, then the top ones."""
    finish_reason: str | None = None
    """"stop", "length" or "abort"; None while generating."""
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = field(default=None)
    """With ``SamplingParams.prompt_logprobs``: per prompt token, {token id: log-probability} (the token itself
    first); None for the first token. Complete once the first output token is."""
    prompt_ranks: list[int | None] | None = field(default=None)
    """Beside ``prompt_logprobs``: each prompt token's rank (1: the most likely); None for the first."""


def merge_deltas(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two outputs of one request back to back as one: ``newer``'s texts, token ids and logprobs appended to
    ``older``'s, everything else ``newer``'s: a cumulative output rebuilt from the one before and a delta
    (``--engine-process``'s parent), or deltas added up (tests). Builds new objects, since readers may still hold
    ``older``; a stream's unread deltas are merged in place instead (``RequestStream``, which alone holds them)."""
    outputs = []
    for old, new in zip(older.outputs, newer.outputs, strict=True):
        assert old.index == new.index, "outputs list their completions in the same order"
        logprobs = old.logprobs + new.logprobs if old.logprobs is not None and new.logprobs is not None else None
        outputs.append(CompletionOutput(new.index, old.text + new.text, old.token_ids + new.token_ids,
                                        new.cumulative_logprob, logprobs, new.finish_reason, new.stop_reason))
    return RequestOutput(newer.request_id, newer.prompt, newer.prompt_token_ids, outputs, newer.finished,
                         newer.num_cached_tokens, newer.metrics, newer.prompt_logprobs or older.prompt_logprobs,
                         newer.prompt_ranks or older.prompt_ranks)
