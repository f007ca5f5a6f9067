"""Continuous batching at the iteration level, under one token budget per step.

Each step the scheduler hands out ``max_num_batched_tokens`` tokens: running sequences first (a decode costs one
token, an unfinished prompt takes the next chunk of what is left), then the draft tokens of decodes that have some
(speculative decoding: a chunk of 1 + d tokens, while budget and free blocks allow), then waiting ones in arrival
order, which may skip their cached prefix. When the KV pool runs dry, the newest running sequence is preempted by
recompute: its blocks are freed (full ones keep their hashes, so resuming usually hits the prefix cache) and it goes
back to the front of the queue. Pure Python.

The "priority" policy (vLLM's ``--scheduling-policy priority``) orders the waiting queue by (priority, arrival), a
lower priority value first, preempted sequences included; and preempts the running sequence with the largest
(priority, arrival), taking back its chunk if it was already scheduled this step.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from loom.engine.block_manager import BlockManager
from loom.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger("loom.engine")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    """Sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Tokens (prefill chunks + decodes) in one forward pass."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so decodes keep flowing beside them."""
    watermark: float = 0.01
    """Fraction of blocks kept free when admitting new sequences, so running ones can grow without preemption."""
    max_loras: int | None = None
    """Distinct LoRA adapters among the running sequences (the model's adapter slots); None: no LoRA."""
    sliding_window: int | None = None
    """Every layer attends through this window (Mistral): blocks behind it are given back as sequences advance."""
    policy: Literal["fcfs", "priority"] = "fcfs"
    """Waiting order and preemption: first come first served, or by each request's priority (lower first), then
    arrival."""
    max_num_encoder_tokens: int | None = None
    """Image tokens whose pictures the vision tower may start encoding in one step (vLLM's encoder budget): a chunk
    that would go past it stops before its picture (a step's first picture runs whatever its size); None: no bound."""

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be fcfs or priority, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int
    """Position of the first token computed this step."""
    num_tokens: int
    """Tokens computed this step, draft tokens included."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Unverified tokens after the sequence's last one (a speculative decode); their KV is written but counts as
    computed only once verified."""

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits give the next token."""
        return self.end - len(self.draft_token_ids) == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        """One verified token (a decode), with any draft tokens after it."""
        return self.num_tokens - len(self.draft_token_ids) == 1

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_slice(self.start, self.end - len(self.draft_token_ids)) + self.draft_token_ids


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)
    """Sequences whose pictures the vision tower failed on (``ImageInput.error``): not scheduled; the engine ends
    them. No chunk ever ran with their pictures' rows, so no block holds KV computed without them."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._encoder_used = 0
        """Image tokens the tower has encoded for this step's chunks (``max_num_encoder_tokens``)."""
        self._failed: list[Sequence] = []
        """This step's ``SchedulerOutput.failed``."""

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.config.policy == "priority":
            self._insert_waiting(seq)
        else:
            self.waiting.append(seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        """Into the waiting queue in (priority, arrival) order, after its equals (a stable order)."""
        key = _priority_key(seq)
        i = len(self.waiting)
        while i > 0 and _priority_key(self.waiting[i - 1]) > key:
            i -= 1
        self.waiting.insert(i, seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._encoder_used, self._failed = 0, out.failed
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            budget = self._add_drafts(out, budget)
            self._schedule_waiting(out, budget)
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed-token counters after the step ran (sampled tokens are appended by the engine)."""
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens = chunk.end
        window = self.config.sliding_window
        if window is not None:
            bs = self.block_manager.block_size
            for chunk in out.chunks:
                # the next query sits at the first unverified position at the earliest; it reads back window - 1
                oldest_needed = chunk.end - len(chunk.draft_token_ids) - window + 1
                if oldest_needed >= bs:
                    self.block_manager.release_front(chunk.seq.seq_id, oldest_needed // bs)

    def reject_drafts(self, chunk: ScheduledChunk, num_accepted: int) -> None:
        """After verification: only the accepted draft tokens' KV counts as computed (the rejected ones' slots are
        overwritten later)."""
        chunk.seq.num_computed_tokens = chunk.end - len(chunk.draft_token_ids) + num_accepted

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id, seq.num_computed_tokens)

    # --- phases --------------------------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = 0 if _ends_when_read(seq) else self._chunk_size(seq, seq.num_computed_tokens, budget)
            if n == 0:
                i += 1
                continue
            while not self.block_manager.allocate(seq.seq_id, seq.tokens, seq.num_computed_tokens + n,
                                                  salt=seq.cache_salt):
                at = self._victim()
                victim = self.running.pop(at)
                if at < i:  # passed earlier this step: its chunk, if it got one, and its tokens are taken back
                    i -= 1
                    chunk = next((c for c in out.chunks if c.seq is victim), None)  # none: it ends when read
                    if chunk is not None:
                        out.chunks.remove(chunk)
                        budget += chunk.num_tokens
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1
        return budget

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> int:
        """Grow each scheduled decode by its sequence's draft tokens, as far as the budget and free blocks allow.

        NOTE: this runs after every running sequence has its blocks, and drafts never preempt: without room for them
        a sequence decodes one token. ``allocate`` hashes only the tokens it is given (the verified ones), so a block
        of draft tokens never becomes a prefix-cache hit.
        """
        for chunk in out.chunks:
            seq = chunk.seq
            drafts = seq.draft_token_ids[:budget]
            if not drafts or not chunk.is_decode or not chunk.samples:
                continue
            if self.block_manager.allocate(seq.seq_id, seq.tokens, chunk.end + len(drafts),
                                           salt=seq.cache_salt):
                chunk.draft_token_ids = drafts
                chunk.num_tokens += len(drafts)
                budget -= len(drafts)
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        reserve = int(self.config.watermark * bm.num_blocks)
        adapters = {s.lora_id for s in self.running if s.lora_id}
        held_back: list[Sequence] = []  # their adapter would exceed max_loras; they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its last token was in flight: admitted once that is read
                break
            if seq.lora_id and seq.lora_id not in adapters and len(adapters) >= (self.config.max_loras or 0):
                held_back.append(self.waiting.popleft())
                continue
            token_ids = seq.hashed_token_ids
            # prompt logprobs need every prompt position's logits: no cached prefix (vLLM's rule too) for the sequence
            # that scores them, until it has (n > 1 siblings and a recompute after the scores are whole may hit)
            scoring = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_token_ids)
            hits = [] if scoring else bm.find_cached_prefix(token_ids, seq.cache_salt)
            computed = len(hits) * bm.block_size
            n = self._chunk_size(seq, computed, budget)
            if n == 0 and seq in self._failed:  # its pictures cannot be encoded: the engine ends it
                self.waiting.popleft()
                continue
            if n == 0:
                break
            needed = bm.blocks_needed(computed + n) - len(hits)
            if needed > bm.num_free_blocks - reserve or not bm.allocate(seq.seq_id, token_ids, computed + n, hits,
                                                                         seq.cache_salt):
                break
            bm.record_prefix_query(seq.num_tokens, computed)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = computed
            seq.num_computed_tokens = computed
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, computed, n))
            budget -= n
            if seq.lora_id:
                adapters.add(seq.lora_id)
        self.waiting.extendleft(reversed(held_back))

    def _victim(self) -> int:
        """Where in ``running`` the sequence to preempt is: the newest (FCFS: never one already passed this step, as
        running sequences are scheduled in order), or the one with the largest (priority, arrival).

        NOTE: of equal keys (n > 1 siblings, a request's several prompts) the later in the list goes, as FCFS's newest;
        vLLM's ``max`` takes the first."""
        last = len(self.running) - 1
        if self.config.policy == "priority":
            return max(range(last, -1, -1), key=lambda k: _priority_key(self.running[k]))
        return last

    def _chunk_size(self, seq: Sequence, computed: int, budget: int) -> int:
        remaining = seq.num_tokens - computed
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        n = min(remaining, budget)
        if seq.images is None:
            return n
        end = seq.images.chunk_end(computed, computed + n)  # a chunk never cuts a span attended both ways
        if end - computed > budget:
            return 0  # it begins in a span too long for this step's budget: the whole span in a later step
        return self._encode(seq, computed, end - computed)

    def _encode(self, seq: Sequence, computed: int, n: int) -> int:
        """The chunk [computed, computed + n) of a pictured prompt, its pictures encoded first if it reaches one whose
        rows are not at hand (a prompt's pictures are encoded together, once, and again after a preemption dropped
        them): cut before the picture when the step's encoder budget is spent (a step's first picture runs whatever its
        size); 0 when the tower fails on them (the sequence goes to ``failed``). Encoding here, before any block is
        allocated for the chunk, keeps a failure out of the KV cache and the prefix cache."""
        images = seq.images
        if images.error is not None:  # an n > 1 sibling's pictures failed
            self._failed.append(seq)
            return 0
        if images.embeds is not None:
            return n
        offsets, _ = images.rows_in(computed, computed + n)
        if not len(offsets):
            return n  # the chunk reaches no picture
        cost, limit = len(images.positions), self.config.max_num_encoder_tokens
        if limit is not None and self._encoder_used and self._encoder_used + cost > limit:
            return int(offsets[0])  # the text before the picture; the picture in a later step
        try:
            images.encode_all()
        except Exception as exc:  # noqa: BLE001 - one prompt's pictures: that request ends, not the step
            log.error("the vision tower failed on request %s's pictures", seq.request_id, exc_info=exc)
            images.error = f"{type(exc).__name__}: {exc}"
            self._failed.append(seq)
            return 0
        self._encoder_used += cost
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id, seq.num_computed_tokens)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.policy == "priority":
            self._insert_waiting(seq)
        else:
            self.waiting.appendleft(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of a request, freeing its blocks."""
        dropped = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in dropped:
            self.finish(seq, "abort")
        return dropped


def _priority_key(seq: Sequence) -> tuple[int, float]:
    return seq.priority, seq.arrival_time


def _ends_when_read(seq: Sequence) -> bool:
    """Its pending tokens reach max_tokens (async scheduling): it finishes once they are read, so the step ahead
    gives it nothing (its token would be past max_tokens, and past the context at max_model_len)."""
    return bool(seq.num_pending) and seq.params.max_tokens is not None and \
        seq.num_output_tokens + seq.num_pending >= seq.params.max_tokens
