"""N-gram (prompt-lookup) speculative decoding: draft tokens from a sequence's own history, verified in one pass.

    llm = LLM("smollm2", speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})

One sequence's round trip: after a step appends its tokens, ``SpecDecoder.propose`` looks up its last n tokens
(n from prompt_lookup_max down to prompt_lookup_min) among its earlier tokens (prompt and output) and keeps the up to
k tokens that followed the latest occurrence as ``seq.draft_token_ids``. The scheduler grows its next decode into a
chunk of 1 + d tokens (``Scheduler._add_drafts``), the model runner returns logits for each of those rows, and
``SpecDecoder.verify`` accepts a prefix of the drafts (``loom.ops.rejection_sampler``: exact for greedy, the
sampled distribution kept for temperature > 0) and rewinds the computed count past the rejected ones; the engine
appends the 1..d + 1 tokens through its usual stop checks, in order.

Not speculated: structured outputs (the grammar would have to advance through the drafts and roll back); those
sequences decode one token a step beside speculative ones. Penalties, min_tokens, logprobs and seeds are kept exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loom.engine.config import SpeculativeConfig
from loom.engine.scheduler import ScheduledChunk, Scheduler
from loom.engine.sequence import Sequence
from loom.ops.rejection_sampler import verify
from loom.ops.sampler import SamplingRow


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix n-gram of ``tokens``
    (min_n <= n <= max_n) found; [] when none is.

    NOTE: every earlier end position is scored at once (numpy, O(len * max_n)): ``run[e]`` counts how many of the
    last tokens match those ending at e, stopping at the first mismatch; the latest e with the longest run wins
    (recent context predicts best when a pattern repeats).
    """
    length = len(tokens)
    max_n = min(max_n, length - 1)
    if k < 1 or max_n < min_n:
        return []
    # alive[e]: tokens[e - m] == tokens[-1 - m] for every m so far; e ranges over [0, length - 2].
    alive = tokens[:-1] == tokens[-1]
    run = alive.astype(np.int32)
    for m in range(1, max_n):
        alive[m:] &= tokens[: length - 1 - m] == tokens[length - 1 - m]
        alive[:m] = False
        if not alive.any():
            break
        run += alive
    best = int(run.max())
    if best < min_n:
        return []
    end = int(np.flatnonzero(run == best)[-1])
    return tokens[end + 1 : end + 1 + k].tolist()


class NgramProposer:
    """Prompt lookup over a sequence's prompt and output. Measured: ~10 us a sequence at 100 tokens of history,
    ~30 us at 1,000 (half of it turning the list into an array), against a model step of milliseconds."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return ngram_lookup(np.array(seq.all_token_ids, dtype=np.int64), self.min_n, self.max_n, k)


@dataclass(slots=True)
class SpecDecodeStats:
    """Counters since start, as vLLM's spec-decode metrics."""

    num_drafts: int = 0
    """Verifications of one sequence with at least one draft token."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] | None = None
    """Accepted drafts by position in the draft (0 = first)."""

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification: the accepted drafts plus the one sampled token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        """Anything with ``propose(seq, k) -> list[int]`` (tests put an oracle here)."""
        self.stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)

    def propose(self, seqs: list[Sequence], num_running: int) -> None:
        """Set each sequence's drafts for the next step (none for finished and structured-output ones, nor for
        anyone while ``num_running`` reaches ``disable_by_batch_size``)."""
        limit = self.config.disable_by_batch_size
        enabled = limit is None or num_running < limit
        for seq in seqs:
            usable = enabled and seq.matcher is None and not seq.is_finished
            seq.draft_token_ids = self._propose(seq) if usable else []

    def verify(self, logits: torch.Tensor, sampling: list[ScheduledChunk], rows: list[SamplingRow],
               scheduler: Scheduler) -> tuple[list[list[int]], list[list[dict[int, float] | None]]]:
        """Tokens to append per sampling chunk (1..d + 1 each) and their logprobs; rewinds rejected drafts."""
        result = verify(logits, rows, [c.draft_token_ids for c in sampling])
        for chunk, accepted in zip(sampling, result.num_accepted):
            if chunk.draft_token_ids:
                scheduler.reject_drafts(chunk, accepted)
                self._count(len(chunk.draft_token_ids), accepted)
        return result.token_ids, result.logprobs

    def _propose(self, seq: Sequence) -> list[int]:
        # d drafts emit up to d + 1 tokens: stay within max_tokens and the context.
        room = min(self.config.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                   self.max_model_len - seq.num_tokens - 1)
        return self.proposer.propose(seq, room)[:room] if room > 0 else []

    def _count(self, num_drafts: int, num_accepted: int) -> None:
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            s.num_accepted_tokens_per_pos[pos] += 1
