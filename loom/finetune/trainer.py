"""The training loop: AdamW, warm-up + cosine, gradient clipping, accumulation normalised per optimizer step.

    trainer = Trainer(cfg, model, tokenizer, examples)
    result = trainer.fit()        # TrainResult: losses per step, tokens/s, elapsed seconds

One optimizer step = ``grad_accum`` micro-batches; every micro-batch's summed token loss is divided by the number of
supervised tokens of the whole step before ``backward``, so the accumulated gradient equals the full-batch one.

On several ranks (``loom.finetune.distributed``) each rank takes its rows of every micro-batch, the divisor is the
step's supervised tokens over all ranks, and the gradient, reduced by DDP or FSDP2, is still the full-batch one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from loom.finetune.checkpoint import full_state, latest_checkpoint, load_checkpoint, save_checkpoint
from loom.finetune.collate import Batch
from loom.finetune.config import FinetuneConfig
from loom.finetune.dataset import collate, micro_batch_plan
from loom.finetune.distributed import (
    Ranks,
    TokenLoss,
    all_sum,
    barrier,
    micro_steps,
    rank_scaled,
    shard,
    without_targets,
    wrap,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepStats:
    loss: float
    """Mean token loss of the step (0.0 when it had no supervised token)."""
    num_supervised: int
    num_tokens: int
    grad_norm: float
    extra: dict[str, float] = field(default_factory=dict)
    """Method-specific metrics (DPO: rewards, margins, accuracy, log-probs)."""

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "supervised_tokens": self.num_supervised,
                "tokens": self.num_tokens, **self.extra}


@dataclass(slots=True)
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    num_tokens: int = 0
    num_supervised: int = 0
    elapsed_s: float = 0.0
    num_pairs: int = 0
    """Preference pairs trained on (DPO, ORPO, SimPO)."""

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def pairs_per_s(self) -> float:
        return self.num_pairs / self.elapsed_s if self.elapsed_s else 0.0


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_for(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPUs here have no fast bf16; train in float32


def accumulate(model, batches: list[Batch], autocast, *, total: int | None = None,
               world_size: int = 1) -> tuple[float, int]:
    """Forward + backward over a step's micro-batches; returns (summed token loss, supervised tokens) of these.

    model: a causal LM, or ``distributed.wrap``'s module (DDP / FSDP2 over ``TokenLoss``). total: the step's
    supervised tokens over all ranks (default: these batches'). Each summed loss is divided by ``total`` and
    multiplied by ``world_size``, which the ranks' gradient averaging divides back out. Gradients are reduced across
    ranks only in the last backward.
    """
    loss_module = model if isinstance(model, (TokenLoss, DistributedDataParallel)) else TokenLoss(model)
    local = sum(b.num_supervised for b in batches)
    divisor = max(local if total is None else total, 1)
    loss_sum = 0.0
    for batch in micro_steps(loss_module, batches):
        with autocast:
            summed, _ = loss_module(batch)
        rank_scaled(summed, world_size, divisor).backward()
        loss_sum += float(summed.detach())
    return loss_sum, local


class Trainer:
    loss_head: type[torch.nn.Module] = TokenLoss
    """What DDP / FSDP2 wrap: the model with the method's forward (``distributed.wrap``)."""

    def __init__(self, cfg: FinetuneConfig, model, tokenizer, examples: list[dict], reporter=None,
                 ranks: Ranks | None = None):
        self.cfg, self.model, self.tokenizer, self.examples = cfg, model, tokenizer, examples
        self.reporter = reporter  # anything with log(step, metrics), e.g. loom.finetune.reporting; None: no logs
        self.ranks = ranks or Ranks()
        # before the optimizer: FSDP2 swaps the parameters
        self.loss_module = wrap(model, cfg.parallelism, self.ranks, self.loss_head)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.lengths = [self.example_length(e) for e in examples]
        self.total_steps = self._total_steps()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; use lora=True or unfreeze the model")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, self.total_steps, cfg.min_lr_ratio)
        )
        self.autocast = autocast_for(self.device, cfg.bf16)

    @staticmethod
    def example_length(example: dict) -> int:
        return len(example["input_ids"])

    @property
    def row_tokens(self) -> int:
        """Tokens a packed row holds."""
        return self.cfg.max_length

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        cfg = self.cfg
        return micro_batch_plan(
            self.lengths,
            batch_size=cfg.batch_size,
            packing=cfg.packing,
            max_length=self.row_tokens,
            seed=cfg.seed,
            epoch=epoch,
            strategy=cfg.packing_strategy,
        )

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * len(self._plan(0)) / self.cfg.grad_accum))

    def micro_batches(self, skip: int = 0) -> Iterator[Batch]:
        """The seeded, endless stream of micro-batches, epoch after epoch (this rank's rows of each); ``skip`` drops
        the first ones (resume: the plan is the same for any number of ranks)."""
        for micro in self.planned(skip):
            rows = shard(micro, self.ranks)
            batch = self.collate(rows or micro[:1])
            yield (batch if rows else self.empty_share(batch)).to(self.device)

    def planned(self, skip: int = 0) -> Iterator:
        """The planned micro-batches, epoch after epoch, less the first ``skip``."""
        epoch = 0
        while True:
            for micro in self._plan(epoch):
                if skip:
                    skip -= 1
                    continue
                yield micro
            epoch += 1

    @staticmethod
    def empty_share(batch: Batch) -> Batch:
        """What a rank runs when its share of a micro-batch is empty: the batch, counting nothing."""
        return without_targets(batch)

    def collate(self, micro: list[list[int]]) -> Batch:
        """One planned micro-batch (rows of example indices) -> tensors."""
        return collate(self.examples, micro, self.pad_id, self.cfg.packing)

    def train_step(self, batches: list[Batch]) -> StepStats:
        self.model.train()
        total, num_tokens = (int(x) for x in all_sum([sum(b.num_supervised for b in batches),
                                                      sum(b.num_tokens for b in batches)], self.device))
        if total == 0:  # nothing to learn in this step (on any rank): no update, no NaN
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return StepStats(0.0, 0, num_tokens, 0.0)
        loss_sum, _ = accumulate(self.loss_module, batches, self.autocast, total=total,
                                 world_size=self.ranks.world_size)
        norm = self.optimizer_step()
        return StepStats(all_sum([loss_sum], self.device)[0] / total, total, num_tokens, norm)

    def optimizer_step(self) -> float:
        """Clip the accumulated gradients, step the optimizer and the schedule, clear; the norm before clipping."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.output) / "checkpoints"

    def _resume(self) -> int:
        if not self.cfg.resume:
            return 0
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.checkpoint_dir)
            return 0
        step = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        log.info("resumed from %s (step %d of %d)", path, step, self.total_steps)
        return step

    def _save(self, step: int) -> None:
        """Every rank gathers (FSDP2 needs all), rank 0 writes, the others wait so that none runs ahead of it."""
        weights, optimizer_state = full_state(self.model, self.optimizer)
        if self.ranks.is_main:
            save_checkpoint(self.checkpoint_dir, step, weights, optimizer_state, self.scheduler, self.cfg.to_dict(),
                            keep=self.cfg.keep_checkpoints)
        barrier()

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or stop after step ``stop_at``, e.g. to time-box a run; resume continues)."""
        start = self._resume()
        stream = self.micro_batches(skip=start * self.cfg.grad_accum)
        result = TrainResult(steps=start)
        bar = _progress(self.cfg.progress and self.ranks.is_main, self.total_steps, start)
        t0 = time.perf_counter()
        for step in range(start, min(self.total_steps, stop_at or self.total_steps)):
            stats = self.train_step([next(stream) for _ in range(self.cfg.grad_accum)])
            result.steps = step + 1
            result.losses.append(stats.loss)
            result.num_tokens += stats.num_tokens
            result.num_supervised += stats.num_supervised
            result.num_pairs += int(stats.extra.get("pairs", 0))
            result.elapsed_s = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{result.tokens_per_s:.0f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.reporter is not None and ((step + 1) % self.cfg.logging_steps == 0
                                              or step + 1 == self.total_steps):
                self.reporter.log(step + 1, {**stats.metrics(), "lr": self.scheduler.get_last_lr()[0],
                                             "tokens_per_s": result.tokens_per_s})
            if self.cfg.save_every and (step + 1) % self.cfg.save_every == 0:
                self._save(step + 1)
        bar.close()
        if self.cfg.save_every and result.steps % self.cfg.save_every:
            self._save(result.steps)
        return result


def _progress(enabled: bool, total: int, initial: int):
    return tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=not enabled, dynamic_ncols=True)
