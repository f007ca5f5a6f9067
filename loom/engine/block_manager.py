"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, ref counts, prefix caching.

Pure Python, and one numpy array: ``table_array`` holds every sequence's table as a row of int32 block ids, written
entry by entry as the lists change, so a step's block tables and cache slots are numpy gathers from it instead of
lists rebuilt per step (vLLM v1's persistent block table).

A block is ``block_size`` token slots in every layer's KV pool. A full block is identified by a hash
chained over (parent block's hash, the block's token ids), so equal hashes mean equal whole prefixes and a new
request can take the cached blocks of an earlier one instead of recomputing them. Free blocks sit in an LRU queue;
a free block keeps its hash (and stays a cache hit) until it is handed out again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def hash_block(parent: Hashable | None, token_ids: Sequence[int]) -> int:
    # NOTE: Python's hash of a tuple of ints is deterministic across processes (no hash randomisation for ints),
    # 64-bit, and cheap; the chain makes a block's hash depend on its whole prefix.
    return hash((parent, tuple(token_ids)))


RELEASED = -1
"""A block-table entry whose block the sequence gave back (out of its sliding window); attention never reads it
(it is masked), and as an index it still names valid memory (the pool's last block)."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}; give the KV cache more memory")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; OrderedDict gives O(1) removal when a cached block is reused.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.seq_hashes: dict[int, list[int]] = {}
        self.released: dict[int, int] = {}
        """Per sequence, how many of its first table entries it gave back (``release_front``)."""
        self.table_array = np.zeros((16, 32), dtype=np.int32)
        """Row ``row_of(seq_id)`` starts with that sequence's table; entries past its length are stale block ids (a
        padding that still indexes the pool). Grows (doubling) when rows or columns run out."""
        self._rows: dict[int, int] = {}
        self._free_rows = list(range(len(self.table_array) - 1, -1, -1))
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # --- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens if self.num_prefix_query_tokens else 0.0

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def row_of(self, seq_id: int) -> int:
        """The sequence's row of ``table_array``."""
        return self._rows[seq_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], salt: Hashable | None = None) -> list[int]:
        """Blocks holding the longest cached prefix of ``token_ids``, always leaving at least one token to compute
        (the last prompt token must run through the model to give logits). ``salt`` starts the hash chain: requests
        whose KV differs for the same tokens (another LoRA adapter) never share blocks."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = salt
        for i in range((len(token_ids) - 1) // bs):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        return hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_prefix_query_tokens += num_query_tokens
        self.num_prefix_hit_tokens += num_hit_tokens

    # --- mutators ------------------------------------------------------------------------------------------
    def allocate(
        self, seq_id: int, token_ids: Sequence[int], num_tokens: int, prefix_blocks: Sequence[int] = (),
        salt: Hashable | None = None,
    ) -> bool:
        """Grow the sequence's table to hold ``num_tokens`` tokens, first taking ``prefix_blocks`` (cache hits).

        Returns False, changing nothing, when too few blocks are free. Full blocks of ``token_ids`` are hashed now
        (chained from ``salt``, as in ``find_cached_prefix``), so a request scheduled later in the same step can
        share them; slots past ``token_ids`` (a speculative decode's draft tokens, not verified yet) are allocated
        but never hashed.
        """
        table = self.tables.get(seq_id)
        if table is not None and not prefix_blocks and len(table) * self.block_size >= num_tokens and (
                not self.enable_prefix_caching
                or len(self.seq_hashes[seq_id]) >= min(num_tokens, len(token_ids)) // self.block_size):
            return True  # most decode steps: the last block has room and no block filled up (nothing to hash)
        table = self.tables.setdefault(seq_id, [])
        num_new = self.blocks_needed(num_tokens) - len(table) - len(prefix_blocks)
        num_revived = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        if num_new > len(self.free_queue) - num_revived:
            if not table:
                del self.tables[seq_id]
            return False
        hashes = self.seq_hashes.setdefault(seq_id, [])
        first_new = len(table)
        for block_id in prefix_blocks:
            self._take(block_id)
            table.append(block_id)
            hashes.append(self.blocks[block_id].hash)
        for _ in range(max(num_new, 0)):
            table.append(self._pop_free())
        self._mirror(seq_id, table, first_new)
        self._cache_full_blocks(seq_id, token_ids, min(num_tokens, len(token_ids)), salt)
        return True

    def release_front(self, seq_id: int, num_blocks: int) -> None:
        """Give back the sequence's first ``num_blocks`` blocks, which its sliding window no longer reaches; their
        table entries become ``RELEASED`` (the table keeps its length, so positions still map to entries). A
        released block keeps its hash: another request with the same prefix may still take it from the cache."""
        table = self.tables.get(seq_id, [])
        done = self.released.get(seq_id, 0)
        for i in range(done, min(num_blocks, len(table))):
            block = self.blocks[table[i]]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None
            table[i] = RELEASED
        if seq_id in self._rows and num_blocks > done:
            self.table_array[self._rows[seq_id], done : min(num_blocks, len(table))] = RELEASED
        self.released[seq_id] = max(done, min(num_blocks, len(table)))

    def free(self, seq_id: int, num_valid_tokens: int | None = None) -> None:
        """Release a sequence's blocks. Blocks past ``num_valid_tokens`` (allocated but never computed, as on
        preemption) lose their hash, so nobody takes them for a cache hit."""
        table = self.tables.pop(seq_id, [])
        self.seq_hashes.pop(seq_id, None)
        self.released.pop(seq_id, None)
        if seq_id in self._rows:
            self._free_rows.append(self._rows.pop(seq_id))
        first_invalid = len(table) if num_valid_tokens is None else num_valid_tokens // self.block_size
        # Tail first: the end of a sequence is the least likely to be shared, so it is evicted first.
        for i in range(len(table) - 1, -1, -1):
            if table[i] == RELEASED:
                continue
            block = self.blocks[table[i]]
            if i >= first_invalid:
                self._uncache(block)
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.hash = None
        self.cached.clear()

    # --- internals -----------------------------------------------------------------------------------------
    def _mirror(self, seq_id: int, table: list[int], start: int) -> None:
        """Copy ``table[start:]`` into the sequence's row (taking a row first if it has none)."""
        row = self._rows.get(seq_id)
        if row is None:
            if not self._free_rows:
                rows = len(self.table_array)
                self._grow(2 * rows, self.table_array.shape[1])
                self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
            row = self._rows[seq_id] = self._free_rows.pop()
        if len(table) > self.table_array.shape[1]:
            self._grow(len(self.table_array), max(len(table), 2 * self.table_array.shape[1]))
        if len(table) > start:
            self.table_array[row, start : len(table)] = table[start:]

    def _grow(self, rows: int, cols: int) -> None:
        grown = np.zeros((rows, cols), dtype=np.int32)
        grown[: len(self.table_array), : self.table_array.shape[1]] = self.table_array
        self.table_array = grown

    def _cache_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_tokens: int, salt: Hashable | None) -> None:
        if not self.enable_prefix_caching:
            return
        bs, table, hashes = self.block_size, self.tables[seq_id], self.seq_hashes[seq_id]
        for i in range(len(hashes), num_tokens // bs):
            h = hash_block(hashes[-1] if hashes else salt, token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = self.blocks[table[i]]
            if h not in self.cached and block.hash is None:
                self.cached[h] = block.block_id
                block.hash = h

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._uncache(block)
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash = None
