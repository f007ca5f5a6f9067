"""Megatron-style tensor parallelism for the Llama family: which part of each weight a rank holds, and the two
collectives a sharded forward needs.

A rank holds a contiguous run of KV-head groups (each KV head with the query heads that share it), so attention
never crosses ranks; q/k/v and gate/up are split by output rows (column-parallel), o_proj and down_proj by input
columns (row-parallel, then an all-reduce sums the partial outputs), a mixture of experts the same way inside every
expert (each rank holds a slice of each expert's columns and routes every token as the others do: the router is
whole on every rank; one all-reduce sums the weighted partial outputs), and the embedding and LM head by vocabulary
rows (an embedding lookup is all-reduced, the LM head's logits gathered on rank 0). Nothing here chooses a backend
or starts a process (``loom.distributed.executor`` does); ranks only call ``all_reduce`` and ``gather_logits``.

KV-head groups need not divide evenly: SmolLM2-135M has 3 KV heads, and with 2 ranks rank 0 holds 2 groups and
rank 1 one (its query heads too). vLLM refuses that shape; splitting unevenly costs only balance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from loom.distributed.shm import SharedMemoryGroup


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``total`` items are cut into ``parts`` contiguous runs whose sizes differ
    by at most one (the larger runs first)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(slots=True)
class TensorParallel:
    """This process's place in a tensor-parallel group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    """None: the default process group."""
    shm: SharedMemoryGroup | None = None
    """Ranks on one CPU machine: all-reduce and gather through shared memory (``loom.distributed.shm``) for the
    tensors that fit its slots; the process group for the rest."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (the partial outputs of a row-parallel matmul)."""
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """Rows [start, end) of the (padded) vocabulary this rank holds: every rank holds ``vocab_shard`` rows, the
        last ones past ``vocab_size`` being zero padding."""
        shard = self.vocab_shard(vocab_size)
        return self.rank * shard, (self.rank + 1) * shard

    def vocab_shard(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    def vocab_rows(self, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """This rank's rows of a [vocab_size, D] table (the embedding, the LM head), zero rows past the vocabulary."""
        start, end = self.vocab_range(vocab_size)
        rows = table[start:end]
        return torch.cat([rows, rows.new_zeros(end - start - rows.shape[0], rows.shape[1])])

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's [S, vocab_shard] logits -> the full [S, vocab_size] on rank 0 (None on the others)."""
        local = local.contiguous()
        if self.shm is not None and self.shm.fits(local):
            parts = self.shm.gather(local)
        else:
            parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
            dist.gather(local, parts, dst=self._global(0), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The attention heads and MLP columns one rank holds, in the full model's numbering."""

    kv_heads: tuple[int, int]
    """KV heads [start, end)."""
    q_heads: tuple[int, int]
    """Query heads [start, end): those that read the KV heads above."""
    intermediate: tuple[int, int]
    """MLP columns [start, end) of gate, of up, and the matching input columns of down_proj."""
    moe_intermediate: tuple[int, int] = (0, 0)
    """Each routed expert's columns, cut the same way (every rank holds a slice of every expert)."""
    shared_intermediate: tuple[int, int] = (0, 0)
    """The shared expert's columns (Qwen2-MoE)."""

    def q_rows(self, head_dim: int) -> slice:
        """The rows of q (and input columns of o_proj) of these heads."""
        return slice(self.q_heads[0] * head_dim, self.q_heads[1] * head_dim)

    def kv_rows(self, head_dim: int) -> slice:
        """The rows of k and of v of these heads."""
        return slice(self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim)


def head_shard(cfg, rank: int, size: int) -> HeadShard:
    """Which heads and MLP columns rank ``rank`` of ``size`` holds of the model ``cfg`` (a ``LlamaConfig``); a clear
    error where the model cannot be split that many ways."""
    kv, heads = cfg.num_key_value_heads, cfg.num_attention_heads
    if getattr(cfg, "qk_norm_full", False) and size > 1:
        raise ValueError("OLMo 2's and OLMoE's q/k norms span every head, which tensor parallelism would split; use "
                         "tensor_parallel_size 1")
    if size > kv:
        raise ValueError(f"tensor_parallel_size {size} exceeds the model's {kv} key-value heads: each rank holds "
                         f"whole KV-head groups; use a tensor_parallel_size of at most {kv}")
    widths = {"the MLP width": cfg.intermediate_size}
    if cfg.num_experts:
        widths["the experts' width"] = cfg.moe_intermediate_size
        if cfg.shared_expert_intermediate_size:
            widths["the shared expert's width"] = cfg.shared_expert_intermediate_size
    for what, width in widths.items():
        if width < size:
            raise ValueError(f"tensor_parallel_size {size} exceeds {what} {width}")
    group = heads // kv
    kv_start, kv_end = split_evenly(kv, size, rank)
    return HeadShard((kv_start, kv_end), (kv_start * group, kv_end * group),
                     split_evenly(cfg.intermediate_size, size, rank),
                     split_evenly(cfg.moe_intermediate_size, size, rank),
                     split_evenly(cfg.shared_expert_intermediate_size, size, rank))


def local_config(cfg, rank: int, size: int):
    """The config of the part of the model rank ``rank`` builds: its heads and MLP (and experts') columns (vocab_size
    stays the full vocabulary: the engine validates token ids against it; the embedding holds the rank's shard)."""
    shard = head_shard(cfg, rank, size)

    def width(run: tuple[int, int]) -> int:
        return run[1] - run[0]

    return replace(cfg, num_attention_heads=width(shard.q_heads), num_key_value_heads=width(shard.kv_heads),
                   intermediate_size=width(shard.intermediate), moe_intermediate_size=width(shard.moe_intermediate),
                   shared_expert_intermediate_size=width(shard.shared_intermediate))
