"""Which adapters the engine knows, which of them sit in the model's ``max_loras`` slots, and a step's row groups.

    llm = LLM("smollm2", enable_lora=True, max_loras=4)
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "out/adapter"))

A ``LoRARequest`` names an adapter folder and gives it an integer id (vLLM's shape); the id is the adapter's identity
everywhere: in the host cache, in the slots, and in the prefix cache, whose block hashes start from it, so two
adapters never share KV blocks (their keys and values differ) while requests of one adapter still do. Adapters are
read once and kept in host memory (``max_cpu_loras`` of them, least recently used first out); a sequence holds its
adapter's weights while it lives, so evicting or unloading one never fails a request in flight. The scheduler admits
at most ``max_loras`` distinct adapters among the running sequences, so a step's adapters always fit the slots.

With tensor parallelism every rank holds its part of each adapter (``loom.models.lora.shard_adapter``, cut as the
base weights are). Rank 0 reads the folder and decides; when it fills a slot it sends the other ranks the whole
adapter (``take_loads``, before the step), which they cut themselves (``RankLoRA``): every rank runs the very
weights rank 0 read, whatever happens to the folder since. Each step's row groups travel with its inputs
(``encode_batch``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from loom.distributed.parallel import HeadShard, head_shard
from loom.engine.scheduler import ScheduledChunk
from loom.models.llama import LlamaConfig, LlamaForCausalLM
from loom.models.lora import LoRABatch, LoRAModel, LoRAWeights, load_peft_adapter, shard_adapter

DENSE_MIN_GROUPS = 3
DENSE_MAX_ROWS = 128
"""A step of at least this many adapter groups and at most this many rows adds the deltas of every slot at once
(``loom.models.lora.LoRABatch``): a few larger matmuls instead of two tiny ones per group. Measured on SmolLM2, 16
decodes over 4 rank-16 adapters, 2 cores: 29.5 ms a base step, 49.6 ms by groups, 39.0 ms dense (docs/benchmarks.md).
"""


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter for a request: a name (what ``/v1/models`` lists), an id > 0 (its identity), the peft folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")


def read_adapter(path: str, cfg: LlamaConfig, max_rank: int, dtype: torch.dtype, device: torch.device, name: str,
                 shard: HeadShard | None) -> LoRAWeights:
    """An adapter folder laid out for the model ``cfg`` (the whole model's); on a tensor-parallel rank 0, this rank's
    part, holding the whole adapter on the CPU (``full``) for the other ranks."""
    if shard is None:
        return load_peft_adapter(path, cfg, max_rank, dtype, device, name=name)
    full = load_peft_adapter(path, cfg, max_rank, dtype, "cpu", name=name)
    local = shard_adapter(full, cfg, shard).to(device)
    local.full = full
    return local


def rank_shard(model: LlamaForCausalLM) -> HeadShard | None:
    return None if model.tp is None else head_shard(model.full_config, model.tp.rank, model.tp.size)


class LoRAManager:
    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int, max_cpu_loras: int | None,
                 dtype: torch.dtype, device: torch.device):
        self.slots = LoRAModel(model, max_loras, max_rank)
        self.full_config = model.full_config
        self.shard = rank_shard(model)
        self._loads: list[tuple[int, LoRAWeights]] = []
        """(slot, whole adapter on the CPU) put in slots since ``take_loads`` (tensor parallelism only)."""
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.dtype, self.device = dtype, device
        self._cache: OrderedDict[int, tuple[LoRARequest, LoRAWeights]] = OrderedDict()
        self._lock = threading.Lock()  # the server loads adapters on its own threads while the engine steps
        self._slot_ids: list[int | None] = [None] * max_loras
        self._slot_used = [0] * max_loras
        self._clock = 0

    @property
    def max_loras(self) -> int:
        return self.slots.max_loras

    def get(self, request: LoRARequest) -> LoRAWeights:
        """The adapter's weights, read from its folder the first time (ValueError when it does not fit)."""
        with self._lock:
            hit = self._cache.get(request.lora_int_id)
            if hit is not None:
                known, weights = hit
                if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                    raise ValueError(f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r};"
                                     " give each adapter its own id")
                self._cache.move_to_end(request.lora_int_id)
                return weights
        weights = read_adapter(request.lora_path, self.full_config, self.slots.max_rank, self.dtype, self.device,
                               request.lora_name, self.shard)
        with self._lock:
            self._cache[request.lora_int_id] = (request, weights)
            while len(self._cache) > self.max_cpu_loras:
                self._cache.popitem(last=False)
        return weights

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter (sequences still running with it keep their copy until they finish)."""
        with self._lock:
            return self._cache.pop(lora_int_id, None) is not None

    def loaded_ids(self) -> list[int]:
        with self._lock:
            return list(self._cache)

    def prepare_step(self, chunks: Seq[ScheduledChunk]) -> None:
        """Put the adapters of ``chunks`` (already grouped by adapter, in row order) in slots and set the row
        groups the wrapped projections read."""
        slot_of = self._activate({c.seq.lora_id: c.seq.lora for c in chunks if c.seq.lora_id})
        segments: list[tuple[int, int, int]] = []
        row = 0
        for c in chunks:
            end = row + c.num_tokens
            if c.seq.lora_id:
                slot = slot_of[c.seq.lora_id]
                if segments and segments[-1][1] == row and segments[-1][2] == slot:
                    segments[-1] = (segments[-1][0], end, slot)
                else:
                    segments.append((row, end, slot))
            row = end
        self.slots.batch.set(segments, row, dense=len(segments) >= DENSE_MIN_GROUPS and row <= DENSE_MAX_ROWS,
                             device=self.device)

    def _activate(self, wanted: dict[int, LoRAWeights]) -> dict[int, int]:
        if len(wanted) > self.max_loras:  # the scheduler never lets this happen
            raise RuntimeError(f"{len(wanted)} adapters in one step, but max_loras is {self.max_loras}")
        self._clock += 1
        slot_of = {}
        for lora_id, weights in wanted.items():
            # the slot must hold these very weights: an id removed and given to another folder reloads
            if lora_id in self._slot_ids and self.slots.slots[self._slot_ids.index(lora_id)] is weights:
                slot_of[lora_id] = self._slot_ids.index(lora_id)
        for lora_id, weights in wanted.items():
            if lora_id not in slot_of:
                free = [s for s in range(self.max_loras) if s not in slot_of.values()]
                slot = min(free, key=lambda s: (self._slot_ids[s] is not None, self._slot_used[s]))
                self.slots.load(slot, weights)
                self._slot_ids[slot] = lora_id
                if self.shard is not None:
                    self._loads.append((slot, weights.full))
                slot_of[lora_id] = slot
        for slot in slot_of.values():
            self._slot_used[slot] = self._clock
        return slot_of

    def take_loads(self) -> list[tuple[int, LoRAWeights]]:
        """The slots filled since the last call: what the other tensor-parallel ranks must load before the step."""
        loads, self._loads = self._loads, []
        return loads


def encode_batch(batch: LoRABatch) -> np.ndarray:
    """A step's row groups as int64s: [dense, groups, (first row, end row, slot) per group]."""
    flat = [v for segment in batch.segments for v in segment]
    return np.array([int(batch.row_slots is not None), len(batch.segments), *flat], dtype=np.int64)


def decode_batch(values: np.ndarray) -> tuple[list[tuple[int, int, int]], bool, int]:
    """``encode_batch``'s groups from the front of ``values``: (segments, dense, int64s read)."""
    dense, count = values[:2].tolist()
    flat = values[2 : 2 + 3 * count].tolist()
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)], bool(dense), 2 + 3 * count


class RankLoRA:
    """A tensor-parallel rank's adapter slots (ranks 1..N-1): it fills a slot when rank 0 does, cutting its part of
    the adapter rank 0 sent, and sets each step's row groups."""

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int):
        self.slots = LoRAModel(model, max_loras, max_rank)
        self.full_config, self.shard = model.full_config, rank_shard(model)
        self.device = model.embed_tokens.weight.device

    def load(self, loads: list[tuple[int, LoRAWeights]]) -> None:
        for slot, full in loads:
            self.slots.load(slot, shard_adapter(full, self.full_config, self.shard).to(self.device))

    def set_step(self, segments: list[tuple[int, int, int]], num_rows: int, dense: bool) -> None:
        self.slots.batch.set(segments, num_rows, dense, self.device)
