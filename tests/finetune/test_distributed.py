"""Multi-process finetuning on CPU: 2 gloo ranks x 1 thread, fp32, a tiny random Llama, against 1 process.

The 2-rank runs go through ``loom finetune --nproc-per-node 2`` (spawned ranks, rank 0 exports); the reference is
the same command on 1 process. Equal exported weights (1e-5) after 4 optimizer steps show that the rows are split
without loss or overlap and that the loss is divided by the global supervised-token count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loom.cli import main
from loom.finetune.checkpoint import load_checkpoint, save_checkpoint
from loom.finetune.cli import train
from loom.finetune.collate import pad_collate
from loom.finetune.config import FinetuneConfig
from loom.finetune.distributed import (
    RankFailed,
    Ranks,
    check_distributed,
    launch,
    process_group,
    ranks_from_env,
    shard,
    without_targets,
)
from scripts.finetune_demo_data import write_jsonl

from .conftest import make_tiny_llama
from .test_loss import RECORDS


def finetune_args(tmp_path, tiny_model_dir, out: str, *extra: str) -> list[str]:
    # 2 rows per micro-batch x 2 micro-batches per step: the packed plan ends each epoch with a 1-row micro-batch,
    # so rank 1 also runs the empty-share path
    return ["finetune", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.jsonl"),
            "--output", str(tmp_path / out), "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2",
            "--max-length", "64", "--lr", "1e-3", "--warmup-steps", "1", "--threads", "1", "--no-progress",
            "--save-every", "2", "--keep-checkpoints", "2", *extra]


def exported(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The 1-process reference and the 2-rank DDP run (the slow part, shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("ddp")
    write_jsonl(RECORDS, tmp / "train.jsonl")
    assert main(finetune_args(tmp, tiny_model_dir, "one")) == 0
    assert main(finetune_args(tmp, tiny_model_dir, "ddp", "--nproc-per-node", "2")) == 0
    return tmp


@pytest.mark.slow
def test_two_ddp_ranks_train_the_same_weights_as_one(runs):
    one, ddp = exported(runs / "one"), exported(runs / "ddp")
    assert_close_weights(ddp, one)
    start = load_file(str(runs / "one" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert any(not torch.equal(start[n], one[n]) for n in start if n in one)  # steps 3-4 did move the weights
    logged = [step_metrics(runs / run) for run in ("one", "ddp")]  # rank 0 reports the step over all ranks
    assert [m["supervised_tokens"] for m in logged[1]] == [m["supervised_tokens"] for m in logged[0]]
    assert [m["tokens"] for m in logged[1]] == [m["tokens"] for m in logged[0]]  # no row trained twice
    assert [m["loss"] for m in logged[1]] == pytest.approx([m["loss"] for m in logged[0]], abs=1e-5)
    assert json.loads((runs / "ddp" / "loom_finetune.json").read_text())["config"]["nproc_per_node"] == 2


def step_metrics(output) -> list[dict]:
    return [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tiny_model_dir):
    resumed = runs / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "ddp" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    assert main(finetune_args(runs, tiny_model_dir, "resumed", "--resume")) == 0
    assert [m["step"] for m in step_metrics(resumed)] == [3, 4]  # it did continue, not start over
    assert_close_weights(exported(resumed), exported(runs / "one"))


@pytest.mark.slow
def test_fsdp2_lora_on_two_ranks_equals_one_rank_and_resumes_on_one(tmp_path, tiny_model_dir):
    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    lora = ["--lora", "--lora-r", "4", "--no-packing"]
    assert main(finetune_args(tmp_path, tiny_model_dir, "one", *lora)) == 0
    assert main(finetune_args(tmp_path, tiny_model_dir, "fsdp", *lora, "--nproc-per-node", "2",
                              "--parallelism", "fsdp")) == 0
    assert_close_weights(exported(tmp_path / "fsdp"), exported(tmp_path / "one"))
    adapters = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("one", "fsdp")]
    assert_close_weights(adapters[1], adapters[0])
    # the sharded run's checkpoint is full and name-keyed: one process without FSDP resumes it
    step_2 = Path("checkpoints") / "step-000002"
    shutil.copytree(tmp_path / "fsdp" / step_2, tmp_path / "resumed" / step_2)
    assert main(finetune_args(tmp_path, tiny_model_dir, "resumed", *lora, "--resume")) == 0
    assert [m["step"] for m in step_metrics(tmp_path / "resumed")] == [3, 4]
    assert_close_weights(exported(tmp_path / "resumed"), exported(tmp_path / "one"))


def test_a_checkpoint_with_the_optimizer_keyed_by_index_still_resumes(tmp_path, tokenizer):
    """Checkpoints written before states were keyed by name hold ``optimizer.state_dict()``."""
    model = make_tiny_llama(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = save_checkpoint(tmp_path, 1, weights, optimizer.state_dict(), scheduler, {})
    fresh = make_tiny_llama(len(tokenizer), seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    step = load_checkpoint(path, fresh, fresh_optimizer, torch.optim.lr_scheduler.LambdaLR(fresh_optimizer,
                                                                                             lambda s: 1.0))
    assert step == 1 and torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    exp_avg = [fresh_optimizer.state[p]["exp_avg"] for p in fresh.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["exp_avg"]) for a, p in zip(exp_avg, model.parameters()))


def _fail_on_rank_1() -> None:
    ranks = ranks_from_env()
    torch.set_num_threads(1)
    with process_group(ranks, torch.device("cpu"), timeout_s=300):
        if ranks.rank == 1:
            raise RuntimeError("rank 1 broke")
        torch.distributed.barrier()  # rank 0 would wait here for 300 s: the launcher must stop it first


def test_a_failing_rank_stops_the_others_with_its_error():
    with pytest.raises(RankFailed, match=r"(?s)^rank 1 failed .*rank 1 broke"):
        launch(_fail_on_rank_1, (), 2)


def test_rows_are_dealt_to_ranks_without_loss_or_overlap():
    micro = [[0, 1], [2], [3, 4], [5], [6]]  # 5 rows of example indices
    shares = [shard(micro, Ranks(r, 3, r, 3)) for r in range(3)]
    assert shares == [[[0, 1], [5]], [[2], [6]], [[3, 4]]]
    assert shard([[7]], Ranks(1, 2, 1, 2)) == []


def test_an_empty_share_supervises_nothing():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]}], pad_id=2)
    empty = without_targets(batch)
    assert batch.num_supervised == 2 and empty.num_supervised == 0 and empty.num_tokens == 0
    assert torch.equal(empty.input_ids, batch.input_ids)


def test_ranks_come_from_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert ranks_from_env(env) == Ranks(3, 4, 1, 2) and not ranks_from_env(env).is_main
    assert ranks_from_env({}) == Ranks() and not Ranks().is_distributed
    with pytest.raises(ValueError, match="out of range"):
        Ranks(rank=2, world_size=2)


def test_settings_several_ranks_cannot_run_are_refused_before_start(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="raise --batch-size to at least 4"):
        check_distributed(4, batch_size=2)
    with pytest.raises(ValueError, match="parallelism must be"):
        FinetuneConfig(model="m", data="d", output="o", parallelism="tp")
    with pytest.raises(ValueError, match="nproc_per_node must be positive"):
        FinetuneConfig(model="m", data="d", output="o", nproc_per_node=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = FinetuneConfig(model="m", data="d", output=str(tmp_path), nproc_per_node=2)
    with pytest.raises(ValueError, match="torchrun's own --nproc-per-node"):
        train(cfg)


# 9 training pairs in micro-batches of 2 (unpacked): each epoch ends with a 1-pair micro-batch, so rank 1 runs the
# stand-in (packed, a row holds several pairs);
# 5 held-out pairs in evaluation batches of 2: rank 0 scores batches 0 and 2, rank 1 batch 1 and a stand-in
PREFERENCE_RUNS = {
    "dpo-lora-ddp": ["--method", "dpo", "--lora", "--lora-r", "4"],  # reference: the adapters switched off
    "dpo-full-fsdp": ["--method", "dpo", "--no-packing", "--parallelism", "fsdp"],  # reference: precomputed
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(PREFERENCE_RUNS))
def test_preference_tuning_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, run):
    """DPO on 2 ranks: the same weights, per-step metrics and held-out figures as on 1 (pairs dealt without loss or
    overlap, the loss divided by the step's pairs over all ranks, the reference and evaluation passes summed)."""
    from .test_preference import PAIRS

    write_jsonl((PAIRS * 3)[:9], tmp_path / "train.jsonl")
    write_jsonl((PAIRS * 2)[:5], tmp_path / "held.jsonl")
    extra = [*PREFERENCE_RUNS[run], "--eval-data", str(tmp_path / "held.jsonl"), "--eval-batch-size", "2",
             "--max-length", "128"]
    assert main(finetune_args(tmp_path, tiny_model_dir, "one", *extra)) == 0
    assert main(finetune_args(tmp_path, tiny_model_dir, "two", *extra, "--nproc-per-node", "2")) == 0
    one, two = (tmp_path / "one", tmp_path / "two")
    assert_close_weights(exported(two), exported(one))
    logged = [step_metrics(one), step_metrics(two)]
    pairs = [m["pairs"] for m in logged[0]]
    assert [m["pairs"] for m in logged[1]] == pairs and len(pairs) == 4
    if "--no-packing" in extra:  # steps of 2 micro-batches of 2 pairs, but the third holds the epoch's last pair
        assert pairs == [4, 4, 3, 4]
    assert [m["tokens"] for m in logged[1]] == [m["tokens"] for m in logged[0]]
    for key in ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen"):
        assert [m[key] for m in logged[1]] == pytest.approx([m[key] for m in logged[0]], abs=1e-4), key
    evals = [json.loads((run / "loom_finetune.json").read_text())["preference_eval"] for run in (one, two)]
    for stage in ("base", "tuned"):
        assert evals[1][stage]["pairs"] == 5
        assert evals[1][stage] == pytest.approx(evals[0][stage], abs=1e-4), stage
    assert evals[0]["tuned"]["rewards/margins"] != evals[0]["base"]["rewards/margins"]  # training did move them
