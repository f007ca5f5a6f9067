"""Collation: padded batches (right padding to the longest) and packed batches (several examples per row).

Padding never touches labels through the pad id: padded positions get label -100 and attention 0 from the examples'
lengths, so a tokenizer whose pad token equals EOS still trains on EOS (huggingface/trl#976).

Packing concatenates examples into rows with position ids restarting at 0 per example and a block-diagonal causal
mask (``[B, 1, T, T]`` boolean, True = may attend) so no example sees another; each example's first label is -100
because it would be predicted from the previous example's last token. Trailing room in a row is padding that forms a
block of its own (no fully masked query rows, so SDPA never produces NaN there)::

    rows = plan_rows([len(e["input_ids"]) for e in examples], max_tokens=512)   # list of lists of example indices
    batch = pack_collate([examples[i] for i in rows[0]], pad_id=tok.pad_token_id)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.finetune.template import IGNORE_INDEX


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, -100 where not supervised
    attention_mask: torch.Tensor  # [B, T] long (padded) or [B, 1, T, T] bool (packed)
    position_ids: torch.Tensor  # [B, T] long
    num_tokens: int
    """Real (non-padding) tokens in the batch."""

    @property
    def num_supervised(self) -> int:
        """Targets that count in the loss (labels shifted by one, as the model predicts token t from < t)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.num_tokens,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pad_collate(examples: list[dict], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked by length (attention 0, label -100), never by id."""
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention[row, :n] = 1
    position_ids = torch.arange(width).expand(len(examples), width).clone()
    return Batch(input_ids, labels, attention, position_ids, int(attention.sum()))


def plan_rows(lengths: list[int], max_tokens: int, decreasing: bool = True) -> list[list[int]]:
    """First-fit(-decreasing) bin packing of example indices into rows of at most ``max_tokens`` tokens.

    Deterministic: ties keep the input order, so a shuffled index order gives a seeded packing. ``decreasing=False``
    keeps the given order (rows mix examples of all lengths, so tasks of different lengths share a row).
    """
    if any(n > max_tokens for n in lengths):
        raise ValueError(f"an example has {max(lengths)} tokens but rows hold {max_tokens}; truncate to max_length")
    rows: list[list[int]] = []
    room: list[int] = []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    for i in order:
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def pack_collate(rows: list[list[dict]], pad_id: int, width: int | None = None) -> Batch:
    """Pack each list of examples into one row; rows are right-padded to ``width`` (default: the longest row)."""
    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = width or max(lengths)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment_ids = torch.full((B, width), -1, dtype=torch.long)  # -1 = padding
    for b, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            n = len(example["input_ids"])
            input_ids[b, start : start + n] = torch.tensor(example["input_ids"])
            labels[b, start : start + n] = torch.tensor(example["labels"])
            labels[b, start] = IGNORE_INDEX  # predicted from the previous example's last token
            position_ids[b, start : start + n] = torch.arange(n)
            segment_ids[b, start : start + n] = s
            start += n
        position_ids[b, start:] = torch.arange(width - start)
    mask = block_causal_mask(segment_ids)
    return Batch(input_ids, labels, mask, position_ids, sum(lengths))


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids (-1 = padding, a block of its own) -> [B, 1, T, T] bool, True where q may attend to k."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (same & causal)[:, None]
