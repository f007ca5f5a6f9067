"""Request and sequence state. A request with ``n`` completions is ``n`` sequences that share the prompt.

Pure Python (no torch): the scheduler and block manager only see token ids and counters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from loom.engine.sampling_params import SamplingParams

PENDING = -1
"""The token id a pending token reads as until the step that samples it is read back."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    seq_id: int
    request_id: str
    index: int
    """Which of the request's n completions this is."""
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``params.prompt_logprobs``: per prompt token so far, {token id: log-probability} (the token itself first,
    then the top ones); None for the first token. Filled chunk by chunk as the prompt is computed."""
    prompt_ranks: list[int | None] | None = None
    """Beside ``prompt_logprobs``: each prompt token's rank in its row (1: the most likely token); None for the
    first."""
    cumulative_logprob: float = 0.0
    """Sum of the sampled tokens' log-probabilities in ``output_logprobs`` (kept as they are appended: a stream's
    outputs would otherwise sum the whole list again at every step)."""
    num_sent_tokens: int = 0
    """Output tokens (and their logprobs) that the request's "delta" outputs have returned so far."""
    num_sent_chars: int = 0
    """Characters of the text that its "delta" outputs have returned so far."""
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache (prefix-cache hits included)."""
    num_cached_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    seed: int = 0
    """The seed of the sampler's uniforms for this sequence (the request's seed + index, or drawn by the engine)."""
    matcher: Any = None
    """The grammar matcher of a structured-output sequence (an llguidance ``LLMatcher``); None when free."""
    priority: int = 0
    """The request's priority under the "priority" scheduling policy: lower is served first (vLLM's rule)."""
    lora_id: int = 0
    """The LoRA adapter's id (``LoRARequest.lora_int_id``); 0: the base model."""
    lora: Any = None
    """The adapter's weights (``loom.models.lora.LoRAWeights``), held while the sequence lives."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Speculative tokens proposed after the last step, to verify in the next one (never part of the tokens above)."""
    sampling_row: Any = None
    """The sampler's view of this sequence (``loom.ops.sampler.SamplingRow``), built by the engine once."""
    images: Any = None
    """A vision model's prompt images (``loom.models.vision.ImageInput``): their embedding rows, and the keys the prefix
    cache hashes in place of their tokens (so a cached block is only reused for the same image). Shared by siblings."""
    num_pending: int = 0
    """Tokens sampled by a step still in flight whose ids the host has not read yet (async scheduling): they count in
    ``num_tokens``, so the next step can be scheduled before they are known, and read as ``PENDING`` in
    ``token_slice``; never in ``output_token_ids`` or ``tokens`` (what is hashed for the prefix cache)."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def hashed_token_ids(self) -> list[int]:
        """``all_token_ids`` as the prefix cache hashes them: an image's tokens as its key (``TokenView``'s reading)."""
        return self.tokens[:]

    @property
    def tokens(self) -> TokenView:
        """``all_token_ids`` as a view: its length and slices without copying the whole list (a running sequence's
        blocks are hashed from it every step, one new block at most)."""
        return TokenView(self)

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler counts: prompt, outputs and the pending ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose ids the host holds (``num_tokens`` less the pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def cache_salt(self) -> tuple[str, int] | None:
        """What the prefix-cache hash chain starts from: KV computed under an adapter is that adapter's alone."""
        return ("lora", self.lora_id) if self.lora_id else None

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while the KV of tokens other than the last sampled one is still missing."""
        return self.num_tokens - self.num_computed_tokens > 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode reads one token of a long one);
        positions of pending tokens read ``PENDING`` (the model runner takes them from the step in flight)."""
        known = self.num_known_tokens
        if end > known:
            pending = [PENDING] * (end - max(start, known))
            return self.token_slice(start, known) + pending if start < known else pending
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


class TokenView:
    """Prompt and output tokens of a sequence as one read-only sequence of ints: ``len`` and slices (what the block
    manager's hashing reads; image tokens read as their image's key, as in ``Sequence.hashed_token_ids``)."""

    __slots__ = ("seq",)

    def __init__(self, seq: Sequence):
        self.seq = seq

    def __len__(self) -> int:
        return self.seq.num_known_tokens

    def __getitem__(self, index: slice) -> list[int]:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("TokenView takes contiguous slices only")
        start, stop, _ = index.indices(self.seq.num_known_tokens)
        ids = self.seq.token_slice(start, max(start, stop))
        images = self.seq.images
        if images is not None and start < images.end:
            ids = [images.keys.get(p, t) for p, t in enumerate(ids, start)]
        return ids
