"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, captured on first use into one memory pool.

A decode step's shapes change every step (batch size, block-table width), and a graph replays fixed shapes at fixed
addresses. So a decode-only step is copied into static buffers sized for the largest bucket — token ids, positions,
cache slots, block tables padded to the model's most blocks per sequence, context lengths — and padded up to the next
bucket (1, 2, 4, 8, 16, 24, 32, ... max_num_seqs): a padded row decodes token 0 at position 0 with a context of one
token, writing its K/V into a scratch block the block manager never hands out, and its logits are dropped. Prefill and
mixed steps, speculative decodes and batches above the largest bucket run eagerly, as do models whose forward asks
the host for a value (a mixture of experts counts its tokens per expert, unless the backend runs its experts in
grouped matmuls: ``llm_engine.no_host_syncs``). ``enforce_eager=True`` turns graphs off.

``capture=False`` runs the same padded static-buffer path eagerly: that is how the logic is tested on a CPU.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from loom.engine.model_runner import Uploader
from loom.ops.attention import AttentionMetadata


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's capture sizes), and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model, kv_caches, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, capture: bool = True):
        """``scratch_block``: a KV block outside the block manager's pool, where padded rows write."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.buckets = batch_buckets(max_num_seqs)
        self.capture = capture
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=device)
        self.tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.uploader = Uploader(device)

    def bucket(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def can_run(self, inputs) -> bool:
        """Decode-only, one sampled row per sequence (no drafts), within the largest bucket."""
        n = len(inputs.input_ids)
        return (not inputs.prefills and len(inputs.decode_tables) == n == len(inputs.logit_rows)
                and np.array_equal(inputs.logit_rows, np.arange(n)) and self.bucket(n) is not None
                and inputs.decode_tables.shape[1] <= self.tables.shape[1])

    @torch.inference_mode()
    def run(self, inputs) -> torch.Tensor:
        n = len(inputs.input_ids)
        b = self.bucket(n)
        self._fill(inputs, n, b)
        if not self.capture:
            return self._forward(b)[:n]
        if b not in self.graphs:
            self._capture(b)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]

    def _fill(self, inputs, n: int, b: int) -> None:
        step = self.uploader.upload(inputs)  # one transfer; the copies below run on the device
        width = inputs.decode_tables.shape[1]
        self.input_ids[:n].copy_(step.input_ids)
        self.positions[:n].copy_(step.positions)
        self.slots[:n].copy_(step.slots)
        self.seq_lens[:n].copy_(step.decode_seq_lens)
        self.tables[:n, :width].copy_(step.decode_tables)
        self.tables[:n, width:] = self.scratch_block
        # rows n..b (padding): token 0 at position 0, context 1, writing into the scratch slot
        self.input_ids[n:b] = 0
        self.positions[n:b] = 0
        self.slots[n:b] = self.scratch_slot
        self.seq_lens[n:b] = 1
        self.tables[n:b] = self.scratch_block

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first into one pool (vLLM's order), so that no step pays a capture: two
        warm-up forwards and a synchronize each, which otherwise land in the first steps of each batch size. The
        static buffers hold padding (token 0 at position 0 writing the scratch block) until the first step."""
        if self.capture:
            for b in reversed(self.buckets):
                if b not in self.graphs:
                    self._capture(b)

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], num_decodes=b, decode_block_tables=self.tables[:b],
                                 decode_seq_lens=self.seq_lens[:b], prefills=[], block_size=self.block_size)
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _capture(self, b: int) -> None:
        for _ in range(2):  # warm up outside the graph (kernels compiled, allocator caches primed)
            self._forward(b)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, logits)
