"""Turns a ``SchedulerOutput`` into one forward pass: flat token batch, positions, cache slots, attention
metadata; returns logits only for the rows that sample (the last token of each chunk that reaches its end, and each
draft token of a speculative decode)."""

from __future__ import annotations

import numpy as np
import torch

from loom.engine.block_manager import BlockManager
from loom.engine.lora import LoRAManager
from loom.engine.scheduler import ScheduledChunk, SchedulerOutput
from loom.models.llama import LlamaForCausalLM
from loom.ops.attention import AttentionMetadata, PrefillChunk


def allocate_kv_caches(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(cfg.num_hidden_layers)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: padded slots are masked, but garbage NaNs there would still poison 0 * NaN.
    On CPU, numpy's calloc gives zero pages lazily, so a multi-GB pool costs nothing until it is written."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    elem = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={2: np.uint16, 4: np.uint32}[elem])
    return torch.from_numpy(raw).view(dtype)


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_manager: BlockManager,
        device: torch.device,
        lora: LoRAManager | None = None,
    ):
        self.model = model
        self.lora = lora
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run the step; returns logits [S + D, V] and the S sampling chunks in row order.

        Row i < S is the last verified token of chunk i (what plain sampling reads); the D rows after them are the
        draft tokens of speculative chunks, chunk by chunk, in order (see ``loom.engine.spec_decode``)."""
        decodes = [c for c in out.chunks if c.is_decode]
        prefills = [c for c in out.chunks if not c.is_decode]
        if self.lora is not None:  # rows of one adapter side by side: one pair of LoRA matmuls per group
            decodes.sort(key=_adapter)
            prefills.sort(key=_adapter)
            self.lora.prepare_step(decodes + prefills)
        ordered = decodes + prefills
        input_ids, positions, slots = self._flatten(ordered)
        meta = self._metadata(decodes, prefills, slots)
        hidden = self.model(self._to_device(input_ids), self._to_device(positions), self.kv_caches, meta)
        rows, draft_rows, sampling = [], [], []
        row = 0
        for chunk in ordered:
            row += chunk.num_tokens
            if chunk.samples:
                num_drafts = len(chunk.draft_token_ids)
                rows.append(row - 1 - num_drafts)
                draft_rows.extend(range(row - num_drafts, row))
                sampling.append(chunk)
        if not sampling:
            return hidden.new_empty((0, 0)), []
        return self.model.compute_logits(hidden[self._to_device(rows + draft_rows)]), sampling

    def _flatten(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int], list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for c in chunks:
            table = self.block_manager.block_table(c.seq.seq_id)
            input_ids.extend(c.token_ids)
            span = range(c.start, c.end)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
        return input_ids, positions, slots

    def _metadata(
        self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk], slots: list[int]
    ) -> AttentionMetadata:
        bm = self.block_manager
        # NOTE: a speculative decode (1 + d tokens) is 1 + d decode rows over the same blocks, row j seeing the
        # context up to its own position: causal attention through the batched decode kernel, not one prefill each.
        tables, seq_lens = [], []
        for c in decodes:
            tables += [bm.block_table(c.seq.seq_id)] * c.num_tokens
            seq_lens += range(c.start + 1, c.end + 1)
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        chunks, row = [], len(tables)
        for c in prefills:
            table = None
            if c.start > 0:
                table = self._to_device(bm.block_table(c.seq.seq_id)[: bm.blocks_needed(c.end)])
            chunks.append(PrefillChunk(row, row + c.num_tokens, c.start, table))
            row += c.num_tokens
        return AttentionMetadata(
            slot_mapping=self._to_device(slots),
            num_decodes=len(tables),
            decode_block_tables=torch.tensor(padded, dtype=torch.int32).reshape(len(tables), width).to(self.device),
            decode_seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(self.device),
            prefills=chunks,
            block_size=self.block_size,
        )

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _adapter(chunk: ScheduledChunk) -> int:
    return chunk.seq.lora_id
