"""Multi-process finetuning: ranks, the process group, DDP / FSDP2 wrapping and the launcher.

    loom finetune ... --nproc-per-node 2                  # Loom starts 2 ranks on this node (torch.multiprocessing)
    torchrun --nproc-per-node 2 --no-python loom finetune ...   # or torchrun does (RANK, WORLD_SIZE, ... in env)

Every rank walks the same seeded plan of micro-batches and takes every R-th row of each (``shard``), so an optimizer
step covers the same examples with any number of ranks; the trainer divides by the step's supervised tokens summed
over all ranks and multiplies by R, because DDP and FSDP2 average the ranks' gradients where the sum is wanted. The
result is the 1-rank gradient, whatever R is; checkpoints hold full (unsharded) states, so any R resumes them.
Preference tuning shares a micro-batch's pairs the same way and divides by the step's pair count over all ranks.

NOTE: Loom starts its ranks with ``torch.multiprocessing.start_processes`` rather than torch's elastic agent: the
ranks are children of the ``loom finetune`` process, a rank that raises ends the others at once (SIGTERM) and the
parent re-raises its traceback; restarts and multi-node rendezvous are what torchrun adds, and torchrun works too.
The process group's timeout is the backstop for a rank that hangs without dying.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel

from loom.distributed.ports import free_port
from loom.finetune.collate import Batch
from loom.finetune.loss import causal_lm_parts, token_loss_sum

PARALLELISMS = ("ddp", "fsdp")


@dataclass(frozen=True, slots=True)
class Ranks:
    """Where this process stands: its rank among ``world_size`` and its index on this node (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"rank {self.rank} / local rank {self.local_rank} out of range for world size "
                             f"{self.world_size} / local world size {self.local_world_size}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, reports, writes checkpoints and the output folder."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one rank when they are absent."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    return Ranks(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def check_distributed(world_size: int, *, batch_size: int) -> None:
    """ValueError for settings that multi-process training cannot run, before any rank starts."""
    if world_size > 1 and batch_size < world_size:
        raise ValueError(f"batch_size {batch_size} is smaller than the {world_size} ranks: each micro-batch's rows "
                         f"are split across the ranks; raise --batch-size to at least {world_size}")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """CUDA: one GPU per rank on its node (cuda:LOCAL_RANK); CPU stays CPU."""
    if device.type == "cuda" and ranks.is_distributed:
        return torch.device("cuda", ranks.local_rank)
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device, timeout_s: float):
    """Join the process group for the ``with`` body (gloo on CPU, NCCL on CUDA) and leave it after; nothing on one
    rank. NOTE: a body that raises does not leave the group: leaving closes the connections at once, and the peers'
    "connection closed" errors would then race this rank's own error to the launcher; the rank's exit closes them,
    after its error is recorded."""
    if not ranks.is_distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,
                            timeout=timedelta(seconds=timeout_s))
    yield
    # Leave together: a rank that tears its connections down while a peer is still in its last collective makes
    # gloo abort that peer ("terminate called without an active exception", seen once under load).
    dist.barrier()
    dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks (one all-reduce, float64 so token counts stay exact); as is on one rank."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (one all-reduce) and return it; as is on one rank."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(micro: list[list[int]], ranks: Ranks) -> list[list[int]]:
    """This rank's rows of a planned micro-batch: rows r, r+R, ... (balanced to one row; [] when it has fewer)."""
    return micro[ranks.rank :: ranks.world_size]


def without_targets(batch: Batch) -> Batch:
    """The same inputs, nothing supervised and no tokens counted: a rank whose share of a micro-batch is empty still
    runs forward and backward (DDP and FSDP2 need every rank in each reduction) and adds exactly zero."""
    return Batch(batch.input_ids, torch.full_like(batch.labels, -100), batch.attention_mask, batch.position_ids, 0)


class TokenLoss(torch.nn.Module):
    """A causal LM with ``token_loss_sum`` as its forward: DDP and FSDP2 act in a module's forward (DDP readies its
    gradient reduction, FSDP2's root gathers the embeddings), and the loss skips the HF model's own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        return token_loss_sum(self.lm, batch)


def wrap(model: torch.nn.Module, parallelism: str, ranks: Ranks,
         head: type[torch.nn.Module] = TokenLoss) -> torch.nn.Module:
    """``head(model)`` (``TokenLoss``, or preference tuning's ``PairLogps``); on several ranks under DDP (replicas) or
    FSDP2 (each decoder layer and the rest sharded over the ranks). Build the optimizer after this: FSDP2 replaces the
    parameters with sharded ones."""
    module = head(model)
    if not ranks.is_distributed:
        return module
    if parallelism == "ddp":
        # device_ids left out: the batches are already on the rank's device, and the same call serves CPU and CUDA
        return DistributedDataParallel(module)
    if parallelism != "fsdp":
        raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    for layer in causal_lm_parts(model)[0].layers:
        fully_shard(layer)
    fully_shard(module)  # the root: embeddings, final norm and the (tied) LM head
    return module


def micro_steps(module: torch.nn.Module, batches: list) -> Iterator:
    """A step's micro-batches, each but the last yielded inside ``no_sync(module)``: run its forward and backward in
    the loop body, and gradients are reduced across ranks in the step's last backward only."""
    for i, batch in enumerate(batches):
        with no_sync(module) if i < len(batches) - 1 else contextlib.nullcontext():
            yield batch


def rank_scaled(summed: torch.Tensor, world_size: int, total: int) -> torch.Tensor:
    """A micro-batch's summed loss as its share of the step's mean over ``total`` items on all ranks, times the world
    size, which DDP's and FSDP2's gradient averaging divides back out (``* 1`` is exact on one rank)."""
    return summed * world_size / total


def no_sync(module: torch.nn.Module):
    """Keep this backward's gradients local (a step's last micro-batch reduces them all); nothing on one rank."""
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: FSDPModule):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def unshard(model: torch.nn.Module, build, ranks: Ranks) -> torch.nn.Module | None:
    """FSDP2 after training: every rank gathers the full weights (a collective); rank 0 loads them into ``build()``
    (a plain copy of the model, on the CPU) and returns it, the others None."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.is_main:
        return None
    plain = build()
    plain.load_state_dict(weights)
    return plain


class RankFailed(RuntimeError):
    """A rank ended with an error (the message holds its traceback); the launcher stopped the others."""


def launch(fn, args: tuple, nproc: int) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes that see the torchrun variables (ranks 0..nproc-1 on this node,
    rendezvous on a free 127.0.0.1 port); returns when all have ended. RankFailed names the rank that failed first
    and gives its traceback: the others then fail too (their peer is gone) or are stopped."""
    port = free_port()
    context = mp.start_processes(_rank_main, args=(fn, args, nproc, port), nprocs=nproc, join=False,
                                 start_method="spawn")
    try:
        while not context.join():
            pass
    except ProcessRaisedException:
        rank, trace = _first_error(context.error_files)
        raise RankFailed(f"rank {rank} failed (the other ranks were stopped):\n{trace}") from None
    except ProcessExitedException as exc:  # killed by a signal (e.g. out of memory) rather than raised
        raise RankFailed(f"rank {exc.error_index} died ({exc}); the other ranks were stopped") from None


def _first_error(error_files: list[str]) -> tuple[int, str]:
    """(rank, traceback) of the earliest error a rank wrote: the cause, not a peer's "connection closed"."""
    written = [(os.path.getmtime(path), rank, path) for rank, path in enumerate(error_files) if os.path.exists(path)]
    _, rank, path = min(written)
    with open(path, "rb") as fh:  # written by our own rank process (torch.multiprocessing's error file)
        return rank, pickle.load(fh)


def _rank_main(rank: int, fn, args: tuple, nproc: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)
