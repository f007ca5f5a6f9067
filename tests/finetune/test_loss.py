"""Numerics on a tiny random Llama: packed == unpacked (logits and loss), accumulation == full batch, no NaN."""

from __future__ import annotations

import torch

from loom.finetune.collate import pack_collate, pad_collate
from loom.finetune.loss import reference_loss, token_loss_sum
from loom.finetune.template import encode_example
from loom.finetune.trainer import accumulate

from .conftest import ALPACA, CHAT

RECORDS = [
    ALPACA,
    CHAT,
    {"instruction": "Name a colour.", "output": "Blue, like the sky on a clear day."},
    {"conversations": [{"from": "human", "value": "Count to five."}, {"from": "gpt", "value": "1 2 3 4 5"}]},
    {"instruction": "Reverse: a b c", "input": "", "output": "c b a"},
    {"instruction": "Say yes.", "output": "yes"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"instruction": "Echo", "input": "ping pong", "output": "ping pong"},
]


def examples(tokenizer):
    return [encode_example(r, tokenizer) for r in RECORDS]


def test_packed_logits_equal_unpacked(tokenizer, tiny_llama):
    exs = examples(tokenizer)[:3]
    packed = pack_collate([exs], pad_id=2, width=sum(len(e["input_ids"]) for e in exs) + 5)  # + trailing padding
    with torch.no_grad():
        logits = tiny_llama(**packed.model_inputs()).logits[0]  # [T, V]
        start = 0
        for ex in exs:
            n = len(ex["input_ids"])
            alone = tiny_llama(input_ids=torch.tensor([ex["input_ids"]])).logits[0]  # [n, V]
            torch.testing.assert_close(logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        assert torch.isfinite(logits).all()  # the padding block produces no NaN either


def test_packed_loss_equals_unpacked_loss(tokenizer, tiny_llama):
    exs = examples(tokenizer)
    padded = pad_collate(exs, pad_id=2)
    packed = pack_collate([exs[:3], exs[3:]], pad_id=2)
    with torch.no_grad():
        s_pad, n_pad = token_loss_sum(tiny_llama, padded)
        s_pack, n_pack = token_loss_sum(tiny_llama, packed)
        reference = reference_loss(tiny_llama, padded)  # HF full-logits path
    assert n_pad == n_pack == sum(sum(1 for x in e["labels"][1:] if x != -100) for e in exs)
    assert abs(float(s_pad / n_pad) - float(s_pack / n_pack)) < 1e-5
    assert abs(float(s_pad / n_pad) - float(reference)) < 1e-5
    # per example too: each example's loss alone equals its share inside the packed row
    with torch.no_grad():
        for ex in exs[:3]:
            s_one, n_one = token_loss_sum(tiny_llama, pad_collate([ex], pad_id=2))
            s_row, n_row = token_loss_sum(tiny_llama, pack_collate([[ex]], pad_id=2))
            assert n_one == n_row and abs(float(s_one) - float(s_row)) < 1e-5


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradient_equals_full_batch(tokenizer, tiny_llama):
    exs = examples(tokenizer)
    # uneven supervised counts per micro-batch: a mean of micro-batch means would differ from the full batch
    micro = [pad_collate(exs[i : i + 2], pad_id=2) for i in range(0, 8, 2)]
    assert len({m.num_supervised for m in micro}) > 1
    accumulate(tiny_llama, [pad_collate(exs, pad_id=2)], _null())
    full = grads(tiny_llama)
    tiny_llama.zero_grad(set_to_none=True)
    accumulate(tiny_llama, micro, _null())
    accumulated = grads(tiny_llama)
    assert full.keys() == accumulated.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
    # the naive mean of micro-batch means gives a different gradient, so the check above can fail
    tiny_llama.zero_grad(set_to_none=True)
    for m in micro:
        s, n = token_loss_sum(tiny_llama, m)
        (s / n / len(micro)).backward()
    naive = grads(tiny_llama)
    assert max(float((naive[k] - full[k]).abs().max()) for k in full) > 1e-5


def test_packed_gradient_accumulation_matches_padded(tokenizer, tiny_llama):
    exs = examples(tokenizer)
    accumulate(tiny_llama, [pad_collate(exs, pad_id=2)], _null())
    full = grads(tiny_llama)
    tiny_llama.zero_grad(set_to_none=True)
    accumulate(tiny_llama, [pack_collate([exs[0:2], exs[2:5]], 2), pack_collate([exs[5:]], 2)], _null())
    for name, g in grads(tiny_llama).items():
        torch.testing.assert_close(g, full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_batch_without_supervised_tokens_gives_zero_not_nan(tokenizer, tiny_llama):
    ex = encode_example(ALPACA, tokenizer)
    empty = {**ex, "labels": [-100] * len(ex["labels"])}
    batch = pad_collate([empty], pad_id=2)
    summed, n = token_loss_sum(tiny_llama, batch)
    assert n == 0 and float(summed.detach()) == 0.0
    loss_sum, total = accumulate(tiny_llama, [batch], _null())
    assert (loss_sum, total) == (0.0, 0)
    assert all(torch.isfinite(p.grad).all() for p in tiny_llama.parameters() if p.grad is not None)
    # the plain mean over zero targets is NaN: this is what the guard avoids
    assert torch.isnan(reference_loss(tiny_llama, batch))


def _null():
    import contextlib

    return contextlib.nullcontext()
