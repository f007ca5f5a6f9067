"""CUDA checks (skipped without a GPU): packed == unpacked through SDPA with the block mask, bf16 autocast training."""

from __future__ import annotations

import random

import pytest
import torch

from loom.finetune.collate import pack_collate, pad_collate
from loom.finetune.config import FinetuneConfig
from loom.finetune.loss import token_loss_sum
from loom.finetune.trainer import Trainer, accumulate, autocast_for

from .conftest import make_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
VOCAB = 1000


def random_examples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in (7, 12, 5, 20, 9, 15, 11, 3):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :], "attention_mask": [1] * n})
    return out


def test_packed_equals_unpacked_on_cuda():
    model = make_tiny_llama(VOCAB).cuda()
    exs = random_examples()
    packed = pack_collate([exs[:4], exs[4:]], pad_id=2).to("cuda")
    padded = pad_collate(exs, pad_id=2).to("cuda")
    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits[0]
        start = 0
        for ex in exs[:4]:
            n = len(ex["input_ids"])
            alone = model(input_ids=torch.tensor([ex["input_ids"]], device="cuda")).logits[0]
            torch.testing.assert_close(logits[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        s1, n1 = token_loss_sum(model, packed)
        s2, n2 = token_loss_sum(model, padded)
        assert n1 == n2 and abs(float(s1 / n1) - float(s2 / n2)) < 1e-4
        with autocast_for(torch.device("cuda"), bf16=True):
            b1, _ = token_loss_sum(model, packed)
            b2, _ = token_loss_sum(model, padded)
        assert abs(float(b1 / n1) - float(b2 / n2)) < 2e-2 and torch.isfinite(b1)


def test_accumulation_and_bf16_training_on_cuda(tmp_path):
    model = make_tiny_llama(VOCAB).cuda()
    exs = random_examples()
    null = autocast_for(torch.device("cpu"), bf16=False)
    accumulate(model, [pad_collate(exs, 2).to("cuda")], null)
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    accumulate(model, [pad_collate(exs[i : i + 2], 2).to("cuda") for i in range(0, 8, 2)], null)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], atol=1e-4, rtol=1e-3, msg=name)
    model.zero_grad(set_to_none=True)
    cfg = FinetuneConfig(model="-", data="-", output=str(tmp_path), batch_size=1, max_length=64, lr=3e-3,
                         max_steps=12, warmup_steps=1, progress=False, device="cuda")
    result = Trainer(cfg, model, _FakeTok(), exs * 4).fit()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


class _FakeTok:
    pad_token_id = 2
    eos_token_id = 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP on NCCL needs 2 GPUs (one per rank)")
def test_two_nccl_ranks_train_the_same_weights_as_one_gpu(tmp_path, tiny_model_dir):
    from loom.cli import main
    from scripts.finetune_demo_data import write_jsonl

    from .test_distributed import assert_close_weights, exported, finetune_args
    from .test_loss import RECORDS

    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    cuda = ["--device", "cuda", "--no-bf16"]
    assert main(finetune_args(tmp_path, tiny_model_dir, "one", *cuda)) == 0
    assert main(finetune_args(tmp_path, tiny_model_dir, "ddp", *cuda, "--nproc-per-node", "2")) == 0
    # cuBLAS sums in an order of its own: a little looser than the CPU's 1e-5
    assert_close_weights(exported(tmp_path / "ddp"), exported(tmp_path / "one"), atol=1e-4)
