"""Tensor parallelism's processes: rank 0 (the engine) schedules and samples; ranks 1..N-1 only run the forward.

    engine = LLMEngine(EngineConfig(model="smollm2", tensor_parallel_size=2))   # starts rank 1 itself

Rank 0 starts the other ranks as fresh Python processes (``python -m loom.engine.tensor_parallel``, one node: unlike
multiprocessing's spawn they never re-import the caller's ``__main__``, so a script needs no ``__main__`` guard) — or,
when ``torchrun`` started every
process (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment; several nodes), rank 0 is the process with
``RANK=0`` and the others call ``run_worker_from_env``. Each rank loads its shard of the weights
(``loom.distributed.parallel``) and a KV pool for its own heads with the same block count, so rank 0's block tables
hold for every rank. Every step rank 0 broadcasts the step's inputs (``StepInputs``: a header of two integers, then
one int64 tensor, into buffers allocated once and grown when a step needs more), every rank runs the forward (the
row-parallel matmuls all-reduce), and the vocabulary shards' logits are gathered on rank 0, which samples.

Backends: gloo on CPU, NCCL on CUDA (the step inputs then travel over a second, gloo group: they live on the host).
A rank that dies is never waited for: a collective with a dead peer fails at once (gloo and NCCL see the closed
connection), and a watcher thread sees a started rank exit while the engine idles; either way the engine raises
``EngineFatalError`` with the rank's exit code, and the server exits with that message.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from loom.distributed import shm
from loom.distributed.parallel import TensorParallel
from loom.distributed.ports import free_port
from loom.distributed.shm import SharedMemoryGroup
from loom.engine.config import EngineConfig
from loom.engine.lora import LoRAManager, RankLoRA, decode_batch, encode_batch
from loom.engine.model_runner import ModelRunner, StepInputs, allocate_kv_caches, build_model
from loom.models.catalogue import resolve_model
from loom.models.loader import load_hf_config

log = logging.getLogger("loom.engine.tensor_parallel")

_STEP, _STOP, _INIT, _LORA_LOAD = 1, 2, 3, 4
_TIMEOUT = datetime.timedelta(days=365)
"""Collective timeout: ranks wait for the next step as long as the server idles (a dead peer fails them at once)."""
_START_TIMEOUT_S = 600.0
"""How long rank 0 waits for the other ranks to load their shards."""


class EngineFatalError(RuntimeError):
    """The engine cannot go on (a tensor-parallel rank died): stop serving, say why."""


@dataclass(slots=True)
class RankSpec:
    """What a rank needs to build its part of the model (pickled to the ranks' stdin)."""

    config: EngineConfig
    model_path: str
    max_model_len: int
    threads: int
    shm_path: str | None = None
    """Ranks on this machine: the shared buffer for all-reduces (``loom.distributed.shm``); None: gloo only."""
    shm_slot_bytes: int = 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def threads_per_rank(size: int) -> int:
    """The cores this process may use, shared evenly by the ranks of one node."""
    return max(1, len(os.sched_getaffinity(0)) // size)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.torch_device()
    return torch.device("cuda", rank % torch.cuda.device_count()) if device.type == "cuda" else device


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class TPWorkers:
    """Rank 0's handle on the other ranks: start them, send each step's inputs, watch them, stop them."""

    def __init__(self, spec: RankSpec):
        self.size = spec.config.tensor_parallel_size
        self.device = rank_device(spec.config, 0)
        self.failure: str | None = None
        """Why the group broke (a rank exited), once it has."""
        self.on_failure: Callable[[str], None] | None = None
        """Called (on the watcher thread) when a started rank exits while the engine is running."""
        self._closing = False
        self._header = torch.zeros(2, dtype=torch.long)
        self._cpu_group = None
        self.processes: list[subprocess.Popen] = []
        self._ready_fds: dict[int, int] = {}
        self.shm: SharedMemoryGroup | None = None
        """This rank's side of the shared-memory all-reduce (CPU ranks started here), None: gloo carries them."""
        self._shm_path: str | None = None
        if launched_by_torchrun():
            self._init_method = "env://"
            return
        self._init_method = f"tcp://127.0.0.1:{free_port()}"
        if self.device.type == "cpu" and shm.usable():
            slot = _slot_bytes(spec.config, load_hf_config(spec.model_path))
            path = shm.create_file(self.size, slot)
            if path is not None:
                spec = replace(spec, shm_path=path, shm_slot_bytes=slot)
                self.shm = SharedMemoryGroup(path, 0, self.size, slot, should_abort=self._peer_gone)
        self._shm_path = spec.shm_path
        for rank in range(1, self.size):
            read_fd, write_fd = os.pipe()
            process = subprocess.Popen(
                [sys.executable, "-m", "loom.engine.tensor_parallel", str(rank), str(self.size), self._init_method,
                 str(write_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,))
            os.close(write_fd)
            process.stdin.write(pickle.dumps(spec))
            process.stdin.close()
            self.processes.append(process)
            self._ready_fds[rank] = read_fd

    def join(self, num_blocks: int) -> None:
        """Wait for every rank to load its shard, form the group, and tell them the KV pool's block count."""
        self._wait_ready()
        self._unlink_shm()  # every rank has it mapped now; the mapping outlives the name
        dist.init_process_group(_backend(self.device), init_method=self._init_method, rank=0, world_size=self.size,
                                timeout=_TIMEOUT)
        self._cpu_group = dist.new_group(backend="gloo", timeout=_TIMEOUT) if self.device.type == "cuda" else None
        self._broadcast_header(_INIT, num_blocks)
        if self.processes:
            threading.Thread(target=self._watch, name="loom-tp-watch", daemon=True).start()

    def send_step(self, inputs: StepInputs, lora: LoRAManager | None = None) -> None:
        """The step's inputs; with LoRA first the adapters rank 0 just put in slots (each whole, which every rank
        cuts its part from), and the step's row groups ahead of its inputs."""
        if self.failure is not None:
            raise EngineFatalError(self.failure)
        payload = inputs.encode()
        if lora is not None:
            loads = lora.take_loads()
            if loads:  # (slot, whole adapter on the CPU): between this engine's own processes
                self._broadcast_header(_LORA_LOAD, len(loads))
                dist.broadcast_object_list([loads], src=0, group=self._cpu_group)
            payload = torch.cat([torch.from_numpy(encode_batch(lora.slots.batch)), payload])
        self._broadcast_header(_STEP, payload.numel())
        dist.broadcast(payload, src=0, group=self._cpu_group)

    def explain(self, exc: BaseException) -> EngineFatalError:
        """The error to raise for a collective that failed (a rank died mid-step)."""
        deadline = time.monotonic() + 5.0  # its socket closes a moment before the process is reaped
        self._reap()
        while self.failure is None and self.processes and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        return EngineFatalError(self.failure or f"a tensor-parallel collective failed ({exc}); the engine cannot "
                                                "continue without every rank — restart it")

    def close(self) -> None:
        """Stop the other ranks (idempotent); after a failure, make sure none is left behind."""
        if self._closing:
            return
        self._closing = True
        self._unlink_shm()
        if dist.is_initialized():
            if self.failure is None:
                try:
                    self._broadcast_header(_STOP, 0)
                except RuntimeError:  # a rank is gone already
                    pass
            dist.destroy_process_group()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def _peer_gone(self) -> bool:
        return self.failure is not None or any(p.poll() is not None for p in self.processes)

    def _unlink_shm(self) -> None:
        if self._shm_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._shm_path)
            self._shm_path = None

    def _broadcast_header(self, kind: int, value: int) -> None:
        self._header[0], self._header[1] = kind, value
        dist.broadcast(self._header, src=0, group=self._cpu_group)

    def _wait_ready(self) -> None:
        """Each started rank writes one JSON line on its pipe once its shard is loaded (or why it failed)."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            for rank, fd in self._ready_fds.items():
                process = self.processes[rank - 1]
                while not select.select([fd], [], [], 1.0)[0]:
                    if process.poll() is not None or time.monotonic() > deadline:
                        what = (f"exited with code {process.returncode}" if process.returncode is not None
                                else f"did not load within {_START_TIMEOUT_S:.0f} s")
                        raise RuntimeError(f"tensor-parallel rank {rank} {what} while loading its shard; see its "
                                           "log above")
                line = os.read(fd, 65536).decode()
                error = json.loads(line).get("error") if line else f"exited with code {process.wait()}"
                if error:
                    raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {error}")
        except BaseException:
            self.close()
            raise
        finally:
            for fd in self._ready_fds.values():
                os.close(fd)
            self._ready_fds.clear()

    def _watch(self) -> None:
        """One thread: wait for the first started rank to exit."""
        exited = threading.Event()
        for process in self.processes:
            threading.Thread(target=lambda p=process: (p.wait(), exited.set()), daemon=True).start()
        exited.wait()
        if self._closing:
            return
        self._reap()
        log.error(self.failure)
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def _reap(self) -> None:
        if self.failure is not None:
            return
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                self.failure = (f"tensor-parallel rank {rank} (pid {process.pid}) exited with code "
                                f"{process.returncode}; the engine cannot continue without every rank — restart it")
                return


def run_worker_from_env(config: EngineConfig) -> None:
    """A ``torchrun``-started rank other than 0 (``loom serve`` calls this instead of serving): load the shard, then
    run steps until rank 0 stops."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != config.tensor_parallel_size:
        raise ValueError(f"torchrun started {size} processes but tensor_parallel_size is "
                         f"{config.tensor_parallel_size}; start as many processes as ranks")
    path = resolve_model(config.model)
    spec = RankSpec(config, str(path), config.context_length(load_hf_config(path)),
                    threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    model, device = _load_shard(rank, size, spec)
    dist.init_process_group(_backend(device), init_method="env://", rank=rank, world_size=size, timeout=_TIMEOUT)
    _serve_steps(model, device, spec)


def _worker_main(rank: int, size: int, init_method: str, ready_fd: int) -> None:
    """A rank started by rank 0: the spec arrives pickled on stdin; one JSON line on ``ready_fd`` says loaded."""
    _die_with_parent()
    spec: RankSpec = pickle.load(sys.stdin.buffer)
    try:
        parts = _load_shard(rank, size, spec)
    except Exception as exc:  # reported to rank 0, which raises it with this rank's number
        os.write(ready_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        raise SystemExit(1) from None
    os.write(ready_fd, json.dumps({"error": None}).encode())
    os.close(ready_fd)
    dist.init_process_group(_backend(parts[1]), init_method=init_method, rank=rank, world_size=size, timeout=_TIMEOUT)
    try:
        _serve_steps(*parts, spec)
    except RuntimeError as exc:  # rank 0 went away mid-collective: nothing left to serve
        log.error("tensor-parallel rank %d stops: %s", rank, exc)
        raise SystemExit(1) from None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies (a killed server leaves no rank behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the ranks still stop at their next collective
        pass


def _load_shard(rank: int, size: int, spec: RankSpec):
    torch.set_num_threads(spec.threads)
    device = rank_device(spec.config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = None
    if spec.shm_path is not None:
        parent = os.getppid()
        group = SharedMemoryGroup(spec.shm_path, rank, size, spec.shm_slot_bytes,
                                  should_abort=lambda: os.getppid() != parent)
    model = build_model(spec.model_path, spec.config, device, spec.max_model_len, TensorParallel(rank, size, shm=group))
    return model, device


@torch.inference_mode()
def _serve_steps(model, device: torch.device, spec: RankSpec) -> None:
    cpu_group = dist.new_group(backend="gloo", timeout=_TIMEOUT) if device.type == "cuda" else None
    header = torch.zeros(2, dtype=torch.long)
    dist.broadcast(header, src=0, group=cpu_group)
    kind, num_blocks = header.tolist()
    if kind != _INIT:
        raise RuntimeError(f"tensor-parallel protocol error: expected the start message, got {kind}")
    cfg = spec.config
    kv = allocate_kv_caches(model, num_blocks, cfg.block_size, model.embed_tokens.weight.dtype, device)
    runner = ModelRunner(model, kv, None, device, block_size=cfg.block_size)
    lora = RankLoRA(model, cfg.max_loras, cfg.max_lora_rank) if cfg.enable_lora else None
    buffer = torch.empty(4096, dtype=torch.long)
    while True:
        dist.broadcast(header, src=0, group=cpu_group)
        kind, length = header.tolist()
        if kind == _STOP:
            break
        if kind == _LORA_LOAD:
            loads = [None]
            dist.broadcast_object_list(loads, src=0, group=cpu_group)
            lora.load(loads[0])
            continue
        if length > buffer.numel():
            buffer = torch.empty(2 * length, dtype=torch.long)
        payload = buffer[:length]
        dist.broadcast(payload, src=0, group=cpu_group)
        if lora is None:
            runner.forward(StepInputs.decode(payload))
            continue
        segments, dense, used = decode_batch(payload.numpy())
        inputs = StepInputs.decode(payload[used:])
        lora.set_step(segments, len(inputs.input_ids), dense)
        runner.forward(inputs)
    dist.destroy_process_group()


def _slot_bytes(config: EngineConfig, hf_config) -> int:
    """Room for the largest tensor a step all-reduces ([tokens, hidden]) or gathers ([rows, vocab shard] float32
    logits); larger ones (none with these settings) take gloo."""
    elem = torch.tensor([], dtype=config.torch_dtype()).element_size()
    drafts = config.speculative_config.num_speculative_tokens if config.speculative_config else 0
    rows = config.max_num_seqs * (1 + drafts)
    vocab_shard = -(-hf_config.vocab_size // config.tensor_parallel_size)
    return max(config.max_num_batched_tokens * hf_config.hidden_size * elem, rows * vocab_shard * 4)




if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
