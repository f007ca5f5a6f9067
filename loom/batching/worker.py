"""Worker processes: each loads its own copy of the model and runs batches sent over a pipe.

The server side (:class:`WorkerProcess`) lives in the event loop: ``worker.send(items, deadlines, on_answer)`` writes
a batch to the pipe at once and ``on_answer`` is called from the pipe's reader callback when the child answers
(``await worker.run(items, deadlines)`` wraps the same in a future); the pipe's file descriptor is watched with
``loop.add_reader`` (no threads).
The child (:func:`worker_main`) is started with ``spawn``, sets its torch thread count before torch is imported,
calls the handler's ``setup`` once and then loops: receive a batch, :func:`run_batch`, send the results back.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.batching.handler import Context, ItemResult, load_handler_class, run_batch


@dataclass(slots=True)
class WorkerSpec:
    """Everything a child needs to build its handler (picklable)."""

    model_name: str
    handler: str
    model_dir: str | None
    worker_index: int
    num_threads: int
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """Where the handler should put its model ("cuda:1"): see loom.batching.placement."""
    batch_size: int = 1


class WorkerDied(RuntimeError):
    """The worker process exited while it held a batch (crash, OOM kill)."""


class WorkerStartError(RuntimeError):
    """The handler's setup failed in the worker; the message holds the child's traceback."""


OnAnswer = Callable[[Any, BaseException | None], None]
"""Called with (the child's answer, None) or (None, the error) once per message sent."""


def worker_main(conn, spec: WorkerSpec) -> None:
    """Child process entry point."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):  # RAYON: HF fast tokenizers' pool
        os.environ[var] = str(spec.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if spec.num_threads > 1 else "false")
    try:
        handler = _build_handler(spec)
    except Exception:  # noqa: BLE001 - report any setup failure to the server
        send(conn, ("failed", traceback.format_exc()))
        return
    send(conn, ("ready", os.getpid()))
    while True:
        try:
            message = recv(conn)
        except (EOFError, OSError):
            return
        if message is None:
            return
        batch_id, items, deadlines = message
        start = time.perf_counter()
        results = run_unexpired(handler, items, deadlines)
        send(conn, ("done", batch_id, results, time.perf_counter() - start))


def send(conn, message: Any) -> None:
    """Pickle ``message`` and write it to the pipe. Plain pickle rather than ``Connection.send``'s ForkingPickler,
    which builds a new pickler and copies copyreg's dispatch table for every message (payloads and results are plain
    values: JSON, text, bytes; tensors would travel by value, not through shared memory)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn) -> Any:
    """The next message :func:`send` wrote on the other end."""
    return pickle.loads(conn.recv_bytes())


def run_unexpired(handler, items: list[Any], deadlines: list[float]) -> list[ItemResult]:
    """run_batch on the items whose deadline (time.monotonic(), the same clock in every process) has not passed."""
    now = time.monotonic()
    live = [i for i, deadline in enumerate(deadlines) if deadline > now]
    results = [ItemResult(error="request waited past its deadline before running", status=504)] * len(items)
    for i, result in zip(live, run_batch(handler, [items[i] for i in live]) if live else []):
        results[i] = result
    return results


def _build_handler(spec: WorkerSpec):
    handler = load_handler_class(spec.handler)()
    ctx = Context(spec.model_name, spec.model_dir, spec.worker_index, spec.num_threads, dict(spec.options),
                  spec.device, spec.batch_size)
    handler.setup(ctx)
    _set_torch_threads(spec.num_threads)
    return handler


def _set_torch_threads(num_threads: int) -> None:
    """Pin torch's pools if the handler uses torch (OMP_NUM_THREADS, set before any import, covers the rest)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # the interop pool already started
        pass


class WorkerProcess:
    """The server's handle on one worker process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child_conn, spec), daemon=True,
                                   name=f"loom-worker-{spec.model_name}-{spec.worker_index}")
        self._child_conn = child_conn
        self._pending: dict[int, OnAnswer] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pid: int | None = None
        self.is_alive = False

    async def start(self, timeout: float = 600.0) -> None:
        """Spawn the child and wait for its handler's setup; raises WorkerStartError with the child's traceback."""
        self._loop = asyncio.get_running_loop()
        self.process.start()
        self._child_conn.close()
        ready: asyncio.Future = self._loop.create_future()
        self._pending[-1] = lambda value, error: _resolve(ready, value, error)
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        # NOTE: uvloop (libuv's uv_poll) turns a watched fd non-blocking; Connection.send/recv expect a blocking one
        # and would fail a large batch with EAGAIN ("Resource temporarily unavailable") once the pipe buffer fills.
        os.set_blocking(self._conn.fileno(), True)
        try:
            self.pid = await asyncio.wait_for(ready, timeout)
        except BaseException:
            await self.stop(grace=0)
            raise
        self.is_alive = True

    def send(self, items: list[Any], deadlines: list[float], on_answer: OnAnswer) -> None:
        """Write one batch to the child now; ``on_answer((results, handler_s), None)`` runs when it answers, or
        ``on_answer(None, WorkerDied)`` if it dies first. Raises WorkerDied if the child is gone already."""
        if not self.is_alive:
            raise WorkerDied(f"worker {self.spec.worker_index} of {self.spec.model_name} is not running")
        batch_id = self._next_id
        self._next_id += 1
        self._pending[batch_id] = on_answer
        try:
            send(self._conn, (batch_id, items, deadlines))
        except (BrokenPipeError, OSError) as exc:
            self._pending.pop(batch_id, None)
            self._mark_dead()
            raise WorkerDied(f"worker {self.spec.worker_index} of {self.spec.model_name} is gone: {exc}") from exc
        except BaseException:  # a payload pickle cannot carry: nothing was sent, nothing will answer
            self._pending.pop(batch_id, None)
            raise

    async def run(self, items: list[Any], deadlines: list[float]) -> tuple[list[ItemResult], float]:
        """Run one batch in the child: (per-item results, seconds the handler took); expired items get 504."""
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self.send(items, deadlines, lambda value, error: _resolve(answer, value, error))
        return await answer

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(recv(self._conn))
        except (EOFError, OSError):
            self._mark_dead()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            _answer(self._pending.pop(-1, None), message[1])
        elif kind == "failed":
            error = WorkerStartError(f"handler setup failed in worker {self.spec.worker_index}:\n{message[1]}")
            _answer(self._pending.pop(-1, None), error=error)
        elif kind == "done":
            _answer(self._pending.pop(message[1], None), (message[2], message[3]))

    def _mark_dead(self) -> None:
        self.is_alive = False
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        error = WorkerDied(f"worker {self.spec.worker_index} of {self.spec.model_name} exited "
                           f"(code {self.process.exitcode})")
        pending, self._pending = self._pending, {}
        for on_answer in pending.values():
            _answer(on_answer, error=error)

    async def stop(self, grace: float = 5.0) -> None:
        """Ask the child to exit after its current batch; kill it if it does not within `grace` seconds."""
        if self.is_alive or self.process.is_alive():
            try:
                send(self._conn, None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace
        while self.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.process.is_alive():
            self.process.kill()
        if self.process.pid is not None:
            await asyncio.to_thread(self.process.join, 5)
        if self.is_alive or self._pending:
            self._mark_dead()
        elif self._loop is not None and not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())
        self.is_alive = False
        self._conn.close()


def _answer(on_answer: OnAnswer | None, value: Any = None, error: BaseException | None = None) -> None:
    if on_answer is not None:
        on_answer(value, error)


def _resolve(future: asyncio.Future | None, result: Any = None, error: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
