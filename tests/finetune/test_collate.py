"""Padding and packing on hand-made examples: exact ids, labels, attention masks and position ids."""

from __future__ import annotations

import pytest
import torch

from loom.finetune.collate import block_causal_mask, pack_collate, pad_collate, plan_rows
from loom.finetune.dataset import micro_batch_plan

EOS = PAD = 2  # SmolLM2: the pad token IS the EOS token (huggingface/trl#976)
A = {"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS], "attention_mask": [1, 1, 1, 1]}
B = {"input_ids": [8, 9, EOS], "labels": [-100, 9, EOS], "attention_mask": [1, 1, 1]}
C = {"input_ids": [4, EOS], "labels": [4, EOS], "attention_mask": [1, 1]}


def test_pad_collate_right_pads_and_masks_by_length_not_by_id():
    batch = pad_collate([A, B], pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, PAD]]
    assert batch.labels.tolist() == [[-100, -100, 7, EOS], [-100, 9, EOS, -100]]  # the real EOS stays supervised
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch.num_tokens == 7
    assert batch.num_supervised == 4  # shifted targets: 7, EOS | 9, EOS


def test_pack_collate_positions_labels_and_block_diagonal_mask():
    batch = pack_collate([[A, B], [C]], pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, EOS, 8, 9, EOS], [4, EOS, PAD, PAD, PAD, PAD, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    # each example's first label is ignored: it would be predicted from the previous example's last token
    assert batch.labels.tolist() == [[-100, -100, 7, EOS, -100, 9, EOS], [-100, EOS, -100, -100, -100, -100, -100]]
    assert batch.num_tokens == 9
    expected_row0 = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert batch.attention_mask.shape == (2, 1, 7, 7)
    assert torch.equal(batch.attention_mask[0, 0], expected_row0)
    # padding is a block of its own: no query row is fully masked (SDPA would give NaN)
    row1 = batch.attention_mask[1, 0]
    assert row1[:2, :2].tolist() == [[True, False], [True, True]] and not row1[2:, :2].any()
    assert row1.any(dim=-1).all()


def test_block_causal_mask_matches_loops():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]])
    mask = block_causal_mask(segments)[0, 0]
    for q in range(8):
        for k in range(8):
            assert bool(mask[q, k]) == (k <= q and segments[0, q] == segments[0, k])


def test_plan_rows_first_fit_decreasing():
    assert plan_rows([5, 3, 4, 2, 6], max_tokens=8) == [[4, 3], [0, 1], [2]]
    assert plan_rows([5, 3, 4, 2, 6], max_tokens=8, decreasing=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="truncate"):
        plan_rows([9], max_tokens=8)


def test_micro_batch_plan_is_seeded_and_covers_every_example():
    lengths = [3, 7, 2, 9, 4, 4, 1, 8]
    a = micro_batch_plan(lengths, batch_size=2, packing=True, max_length=10, seed=1, epoch=0)
    assert a == micro_batch_plan(lengths, batch_size=2, packing=True, max_length=10, seed=1, epoch=0)
    assert a != micro_batch_plan(lengths, batch_size=2, packing=True, max_length=10, seed=1, epoch=1)
    flat = sorted(i for micro in a for row in micro for i in row)
    assert flat == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for micro in a for row in micro)
    ff = micro_batch_plan(lengths, batch_size=2, packing=True, max_length=10, seed=1, epoch=0, strategy="ff")
    assert sorted(i for micro in ff for row in micro for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for micro in ff for row in micro)
    padded = micro_batch_plan(lengths, batch_size=3, packing=False, max_length=10, seed=1, epoch=0)
    assert [len(m) for m in padded] == [3, 3, 2] and all(len(row) == 1 for m in padded for row in m)
