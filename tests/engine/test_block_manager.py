"""Block manager: exact block ids for allocation, prefix-cache hits, ref counts, LRU reuse and frees."""

import pytest

from loom.engine.block_manager import BlockManager


def tokens(n: int, offset: int = 0) -> list[int]:
    return list(range(offset, offset + n))


def test_allocation_hands_out_blocks_in_order_and_frees_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(1, tokens(10), 10)
    assert bm.block_table(1) == [0, 1, 2]
    assert bm.allocate(2, tokens(5, 100), 5)
    assert bm.block_table(2) == [3, 4]
    assert bm.num_free_blocks == 3
    # Growing by one token within the last block takes nothing; crossing a boundary takes the next free block.
    assert bm.allocate(1, tokens(12), 12)
    assert bm.block_table(1) == [0, 1, 2]
    assert bm.allocate(1, tokens(13), 13)
    assert bm.block_table(1) == [0, 1, 2, 5]
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_allocation_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate(1, tokens(8), 8)
    assert not bm.allocate(2, tokens(9, 50), 9)
    assert bm.block_table(2) == []
    assert bm.num_free_blocks == 1


def test_prefix_cache_hit_shares_full_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = tokens(10)
    assert bm.allocate(1, prompt, 10)
    assert bm.block_table(1) == [0, 1, 2]
    # Same first 8 tokens, then different: the two full blocks are hits.
    other = prompt[:8] + [99, 98, 97]
    hits = bm.find_cached_prefix(other)
    assert hits == [0, 1]
    assert bm.allocate(2, other, 11, hits)
    assert bm.block_table(2) == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    bm.free(1)
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 0]
    bm.free(2)
    assert bm.num_free_blocks == 10


def test_hit_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate(1, tokens(8), 8)
    # An identical 8-token prompt may only reuse the first block: the last token must run to give logits.
    assert bm.find_cached_prefix(tokens(8)) == [0]
    assert bm.find_cached_prefix(tokens(9)) == [0, 1]


def test_hash_covers_whole_prefix():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate(1, tokens(8), 8)
    # Second block's tokens equal, first block different: no hit at all.
    assert bm.find_cached_prefix([50, 51, 52, 53] + tokens(4, 4) + [0]) == []


def test_freed_cached_blocks_stay_hits_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate(1, tokens(8), 8)  # blocks 0, 1 cached
    bm.free(1)  # freed tail first: queue is 2, 3, 1, 0
    assert bm.find_cached_prefix(tokens(9)) == [0, 1]
    assert bm.allocate(2, tokens(4, 100), 4)
    assert bm.block_table(2) == [2]
    assert bm.allocate(3, tokens(4, 200), 4)
    assert bm.block_table(3) == [3]
    assert bm.allocate(4, tokens(4, 300), 4)
    assert bm.block_table(4) == [1]  # evicts the second cached block first
    assert bm.find_cached_prefix(tokens(9)) == [0]


def test_reviving_a_free_cached_block_counts_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate(1, tokens(8), 8)
    bm.free(1)
    hits = bm.find_cached_prefix(tokens(13))
    assert hits == [0, 1]
    # Needs the two hits plus two new blocks: only one block is free besides the hits.
    assert not bm.allocate(2, tokens(13), 13, hits)
    assert bm.num_free_blocks == 3
    assert bm.allocate(2, tokens(12), 12, hits)
    assert bm.block_table(2) == [0, 1, 2]


def test_preempted_blocks_past_computed_tokens_are_not_cache_hits():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate(1, tokens(12), 12)  # hashed at allocation: blocks 0, 1, 2
    bm.free(1, num_valid_tokens=4)  # only the first block was computed before preemption
    assert bm.find_cached_prefix(tokens(13)) == [0]


def test_prefix_hit_rate():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.record_prefix_query(10, 0)
    bm.record_prefix_query(10, 8)
    assert bm.prefix_hit_rate == pytest.approx(0.4)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    assert bm.allocate(1, tokens(9), 9)
    assert bm.find_cached_prefix(tokens(9)) == []


def test_release_front_gives_back_blocks_behind_a_window_and_free_skips_them():
    from loom.engine.block_manager import RELEASED

    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 120))  # 5 full blocks
    assert bm.allocate(1, tokens, 20)
    table = list(bm.block_table(1))
    bm.release_front(1, 3)
    assert bm.block_table(1) == [RELEASED] * 3 + table[3:]  # the table keeps its length
    assert bm.num_free_blocks == 8 - 5 + 3
    bm.release_front(1, 3)  # idempotent
    assert bm.num_free_blocks == 6
    # a released block keeps its hash: a new request with the same prefix still hits it
    assert bm.find_cached_prefix(tokens[:9]) == table[:2]
    bm.free(1, 20)
    assert bm.num_free_blocks == 8


def assert_mirrored(bm: BlockManager) -> None:
    rows = [bm.row_of(seq_id) for seq_id in bm.tables]
    assert len(set(rows)) == len(rows)  # one row per sequence
    for seq_id, table in bm.tables.items():
        assert bm.table_array[bm.row_of(seq_id), : len(table)].tolist() == table, seq_id


def test_the_table_array_mirrors_every_table_through_allocations_hits_releases_and_frees():
    """The step builder reads block tables from one int32 array, a row per sequence, kept in step by every change the
    lists see (never rebuilt): random growth, prefix hits, windows given back, frees and row reuse, and the array
    growing past its first rows and columns."""
    import random

    rng = random.Random(0)
    bm = BlockManager(num_blocks=2000, block_size=4)
    prompts: dict[int, list[int]] = {}
    lengths: dict[int, int] = {}
    next_id = most_alive = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.2 or not prompts:  # a new sequence, half of them sharing a prefix with an earlier one
            base = prompts[rng.choice(list(prompts))][:12] if prompts and rng.random() < 0.5 else []
            prompt = base + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
            hits = bm.find_cached_prefix(prompt)
            n = len(hits) * 4 + rng.randrange(1, len(prompt) - len(hits) * 4 + 1)
            if bm.allocate(next_id, prompt, n, hits):
                prompts[next_id], lengths[next_id] = prompt, n
            next_id += 1
        elif op < 0.75:  # a sequence grows by a decode or a chunk
            seq_id = rng.choice(list(prompts))
            grown = lengths[seq_id] + rng.choice([1, 1, 1, 5, 17, 90])
            prompts[seq_id] += [rng.randrange(1000) for _ in range(max(0, grown - len(prompts[seq_id])))]
            if bm.allocate(seq_id, prompts[seq_id], grown):
                lengths[seq_id] = grown
        elif op < 0.85:  # a window gives back its oldest blocks
            seq_id = rng.choice(list(prompts))
            bm.release_front(seq_id, rng.randrange(len(bm.block_table(seq_id)) + 1))
        else:
            seq_id = rng.choice(list(prompts))
            bm.free(seq_id, lengths[seq_id])
            del prompts[seq_id], lengths[seq_id]
        assert_mirrored(bm)
        most_alive = max(most_alive, len(bm.tables))
    assert len(bm.table_array) <= max(16, 2 * most_alive)  # freed rows are reused
    assert next_id > 100 and bm.table_array.shape[0] > 16 and bm.table_array.shape[1] > 32  # both grew
