"""One served model: its queue, its worker processes and the loop that feeds each worker batches.

Each worker has one asyncio task in the server: take a batch from the queue (see :mod:`loom.batching.batcher`),
send it to the worker process, hand each caller its result. Scaling down asks the newest workers' loops to stop
after their current batch; unregistering stops new requests, waits for the queue to empty and every batch to
finish, then stops the processes. No request that was accepted is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from loom.batching.batcher import BatchQueue, DeadlineExceeded, PendingRequest, QueueFull
from loom.batching.config import ModelConfig
from loom.batching.handler import ItemResult
from loom.batching.metrics import BatchingMetrics, cpu_seconds
from loom.batching.placement import DevicePlacer
from loom.batching.worker import WorkerProcess, WorkerSpec

BUSY_WINDOW_S = 10.0
log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    """The model is draining or has no workers; answer 503."""


@dataclass(slots=True)
class ItemFailed(Exception):
    """The handler failed this one request (status from its ItemError, 500 otherwise)."""

    message: str
    status: int


@dataclass(eq=False)
class WorkerSlot:
    """A worker process plus its feeding loop and busy-time bookkeeping."""

    index: int
    process: WorkerProcess
    task: asyncio.Task | None = None
    is_stopping: bool = False
    num_batches: int = 0
    num_requests: int = 0
    busy_seconds: float = 0.0
    busy_since: float | None = None
    """When the worker started its current batch (None: idle)."""
    outstanding: int = 0
    """Batches sent and not yet answered (at most 2: the running one and one full batch waiting in the pipe)."""
    running: asyncio.Future | None = None
    """Resolves when the worker answers the batch it runs now (None: the worker waits for a first batch)."""
    recent: deque = field(default_factory=deque)
    """(start, end) monotonic times of batches that ended within the busy window."""

    def busy_fraction(self, now: float) -> float:
        """Share of the last BUSY_WINDOW_S seconds this worker spent running batches."""
        start = now - BUSY_WINDOW_S
        while self.recent and self.recent[0][1] < start:
            self.recent.popleft()
        busy = sum(min(e, now) - max(s, start) for s, e in self.recent)
        if self.busy_since is not None:
            busy += now - max(self.busy_since, start)
        return min(1.0, busy / BUSY_WINDOW_S)


class ServedModel:
    """A registered model; create with ``await ServedModel.create(config, metrics)``."""

    def __init__(self, config: ModelConfig, metrics: BatchingMetrics | None = None,
                 placer: DevicePlacer | None = None):
        self.config = config
        self.metrics = metrics
        self.placer = placer or DevicePlacer(["cpu"])  # the server's, shared by all its models
        self.queue = BatchQueue(config.max_queue_size, config.batch_size, config.max_batch_delay / 1000,
                                config.dispatch_when_idle)
        self.slots: list[WorkerSlot] = []
        self.is_accepting = True
        self.in_flight_batches = 0
        self.in_flight_requests = 0
        self._next_index = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._scale_lock = asyncio.Lock()
        self._recent_batch_s: deque[float] = deque(maxlen=32)
        self.created_at = time.time()

    @classmethod
    async def create(cls, config: ModelConfig, metrics: BatchingMetrics | None = None,
                     placer: DevicePlacer | None = None) -> ServedModel:
        model = cls(config, metrics, placer)
        try:
            await model.scale(config.workers)
        except BaseException:
            await model.stop(drain=False)
            raise
        return model

    # ---- requests -------------------------------------------------------------------------------------------
    async def submit(self, payload: Any, timing: dict | None = None) -> Any:
        """Queue one request and wait for its result; raises QueueFull, DeadlineExceeded, ItemFailed, ModelUnavailable.

        timing, if given, receives queue_ms (arrival to leaving the queue) and inference_ms (the worker's handler
        time for the batch that carried this request).
        """
        self._check_accepting()
        request = self._enqueue(payload)
        self._dispatch_now()
        return await self._wait(request, timing)

    def submit_all(self, payloads: list[Any]) -> list[Awaitable[Any]]:
        """Queue every payload now or none of them (QueueFull when they do not all fit; ModelUnavailable).

        Returns one awaitable per payload, in order, each resolving like :meth:`submit`; await them all.
        """
        self._check_accepting()
        free = self.queue.max_size - len(self.queue)
        if len(payloads) > free:
            self._count("rejected", len(payloads))
            raise QueueFull(f"{len(payloads)} inputs do not fit: the queue has room for {max(0, free)} "
                            f"(max_queue_size={self.queue.max_size})")
        requests = [self._enqueue(payload) for payload in payloads]
        self._dispatch_now()  # after all are queued, so that they can share a batch
        return [self._wait(request) for request in requests]

    def _check_accepting(self) -> None:
        if not self.is_accepting:
            raise ModelUnavailable(f"model {self.config.name} is being unregistered")
        if not self.slots:
            raise ModelUnavailable(f"model {self.config.name} has no workers; scale it up with "
                                   f"PUT /models/{self.config.name}")

    def _enqueue(self, payload: Any) -> PendingRequest:
        try:
            request = self.queue.put(payload, self.config.request_timeout / 1000)
        except QueueFull:
            self._count("rejected")
            raise
        self._idle.clear()
        self.in_flight_requests += 1
        self._observe_depth()
        return request

    async def _wait(self, request: PendingRequest, timing: dict | None = None) -> Any:
        try:
            return await self._await_result(request)
        finally:
            if timing is not None and request.inference_s is not None:
                timing["queue_ms"] = (request.dequeued_at - request.arrival) * 1000
                timing["inference_ms"] = request.inference_s * 1000
            self.in_flight_requests -= 1
            self._observe_depth()
            if self.in_flight_requests == 0:
                self._idle.set()

    def _dispatch_now(self) -> None:
        """Start a batch here if the batching rule lets one leave now and a worker waits for a first batch."""
        # NOTE: the worker loops would take it too, but one event-loop iteration later; on the lone-request path
        # every iteration is latency. The loop of the slot adopts the batch (slot.running) when it wakes.
        slot = next((s for s in self.slots if s.running is None and not s.is_stopping and s.process.is_alive), None)
        if slot is None:
            return
        batch = self.queue.take_ready(self.in_flight_batches)
        if batch:
            slot.running = self._start_batch(slot, batch)
            self.queue.notify()

    async def _await_result(self, request: PendingRequest) -> Any:
        # NOTE: one timer per request rather than wait_for(shield(future)), whose chain of callbacks costs three
        # event-loop iterations between the worker's answer and this coroutine. The timer fails the request only
        # while it still waits in the queue; once a worker took it, it runs to the end.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, request.deadline - time.monotonic()), self._expire_waiting, request)
        try:
            result: ItemResult = await request.future
        except DeadlineExceeded:
            self._count("timeout")
            raise
        finally:
            timer.cancel()
            if request.future.cancelled():  # the caller went away: a request still waiting never runs
                self.queue.remove(request)
        if result.status == 504:  # expired while waiting in the worker's pipe behind the running batch
            self._count("timeout")
            raise DeadlineExceeded(result.error)
        if result.error is not None:
            self._count("error" if result.status >= 500 else "bad_request")
            raise ItemFailed(result.error, result.status)
        self._count("ok")
        return result.value

    def _expire_waiting(self, request: PendingRequest) -> None:
        if self.queue.remove(request) and not request.future.done():  # still waiting: it never ran
            request.future.set_exception(
                DeadlineExceeded(f"request waited {self.config.request_timeout:.0f} ms in the queue"))

    # ---- worker loops ---------------------------------------------------------------------------------------
    async def _feed(self, slot: WorkerSlot) -> None:
        """Give this worker batches until it is asked to stop; a dead worker's batches fail with 500."""
        while slot.running is not None or not slot.is_stopping:
            if slot.running is None:
                batch = await self.queue.next_batch(self.in_flight_batches,
                                                    lambda: slot.is_stopping or slot.running is not None)
                if batch:
                    slot.running = self._start_batch(slot, batch)
                continue
            # NOTE: while the worker runs a batch, a FULL next batch may already go down its pipe (only when every
            # worker is busy), so the worker starts it the moment it finishes instead of waiting for this process
            # to be scheduled, read the results and send more: on a loaded machine that gap cost ~15% throughput.
            current = slot.running
            following = await self.queue.next_batch(self.in_flight_batches,
                                                    lambda c=current: c.done() or slot.is_stopping,
                                                    full_only=self._every_worker_busy)
            slot.running = self._start_batch(slot, following) if following else None
            await current
            if not slot.process.is_alive:
                if slot.running is not None:
                    await slot.running
                asyncio.create_task(self._replace(slot))
                return

    def _every_worker_busy(self) -> bool:
        return all(s.outstanding > 0 for s in self.slots)

    async def _replace(self, slot: WorkerSlot) -> None:
        """A worker died: drop it and start a fresh one in its place (unless the model is going away)."""
        async with self._scale_lock:
            if slot not in self.slots:
                return
            log.warning("worker %d of %s (pid %s) died with exit code %s; starting a replacement", slot.index,
                        self.config.name, slot.process.pid, slot.process.process.exitcode)
            self.slots.remove(slot)
            await slot.process.stop(grace=0)
            if self.is_accepting:
                with contextlib.suppress(Exception):
                    await self._add_workers(1, len(self.slots) + 1)

    def _start_batch(self, slot: WorkerSlot, batch: list[PendingRequest]) -> asyncio.Future:
        """Send a batch down the worker's pipe now; the returned future resolves once every caller has its result."""
        done = asyncio.get_running_loop().create_future()
        self.in_flight_batches += 1
        slot.outstanding += 1
        sent = time.monotonic()
        if slot.busy_since is None:
            slot.busy_since = sent
        self._observe_batch_start(batch, sent)

        def on_answer(answer: tuple | None, error: BaseException | None) -> None:
            try:
                self._finish_batch(slot, batch, sent, answer, error)
            finally:
                done.set_result(None)  # the worker's loop moves on whatever happened

        try:
            slot.process.send([r.payload for r in batch], [r.deadline for r in batch], on_answer)
        except Exception as exc:  # noqa: BLE001 - WorkerDied, or a payload the pipe could not carry
            on_answer(None, exc)
        return done

    def _finish_batch(self, slot: WorkerSlot, batch: list[PendingRequest], sent: float, answer: tuple | None,
                      error: BaseException | None) -> None:
        """Hand each caller its result (called from the pipe's reader, so callers wake in the next iteration)."""
        end = time.monotonic()
        if error is None:
            results, handler_s = answer
        else:
            results = [ItemResult(error=f"worker failed while running this request: {error}", status=500)] * len(batch)
            handler_s = end - sent
        for request, result in zip(batch, results):
            request.inference_s = handler_s
            if not request.future.done():
                request.future.set_result(result)
        self.in_flight_batches -= 1
        slot.outstanding -= 1
        # Busy time is what the worker reports for the handler (a batch waiting in its pipe is not busy).
        slot.recent.append((end - handler_s, end))
        slot.busy_seconds += handler_s
        slot.busy_since = end if slot.outstanding else None
        slot.num_batches += 1
        slot.num_requests += len(batch)
        self._recent_batch_s.append(handler_s)
        if self.metrics:
            self.metrics.inference_seconds.labels(self.config.name).observe(handler_s)
        self.queue.notify()  # a worker is free (or a prefetch slot opened)

    # ---- scaling and draining -------------------------------------------------------------------------------
    async def scale(self, workers: int) -> None:
        """Start or stop worker processes until `workers` run; stopping ones finish their current batch first."""
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        async with self._scale_lock:
            if workers > len(self.slots):
                await self._add_workers(workers - len(self.slots), workers)
            elif workers < len(self.slots):
                await self._remove_workers(self.slots[workers:])
            self.config = self.config.updated(workers=workers)

    async def _add_workers(self, count: int, total: int) -> None:
        new = []
        for _ in range(count):
            spec = WorkerSpec(self.config.name, self.config.handler, self.config.path, self._next_index,
                              self.config.threads(total), dict(self.config.options), self.placer.next(),
                              self.config.batch_size)
            self._next_index += 1
            new.append(WorkerSlot(spec.worker_index, WorkerProcess(spec)))
        results = await asyncio.gather(*(s.process.start() for s in new), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(s.process.stop(grace=0) for s in new))
            raise failed[0]
        for slot in new:
            slot.task = asyncio.create_task(self._feed(slot), name=f"loom-feed-{self.config.name}-{slot.index}")
            self.slots.append(slot)

    async def _remove_workers(self, leaving: list[WorkerSlot]) -> None:
        for slot in leaving:
            slot.is_stopping = True
        self.slots = [s for s in self.slots if not s.is_stopping]
        self.queue.notify()
        await asyncio.gather(*(s.task for s in leaving if s.task), return_exceptions=True)
        await asyncio.gather(*(s.process.stop() for s in leaving))

    async def stop(self, drain: bool = True) -> None:
        """Refuse new requests, wait (if drain) until every accepted one is answered, then stop the workers."""
        self.is_accepting = False
        if drain and self.slots:
            await self._idle.wait()
        async with self._scale_lock:
            await self._remove_workers(list(self.slots))

    def update_batching(self, batch_size: int | None = None, max_batch_delay: float | None = None) -> None:
        """Change batch settings live; the next batch uses them."""
        changes = {k: v for k, v in (("batch_size", batch_size), ("max_batch_delay", max_batch_delay)) if v is not None}
        self.config = self.config.updated(**changes)
        self.queue.batch_size = self.config.batch_size
        self.queue.max_batch_delay_s = self.config.max_batch_delay / 1000
        self.queue.notify()

    # ---- reporting ------------------------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained a batch's worth: for the Retry-After header."""
        mean_batch_s = sum(self._recent_batch_s) / len(self._recent_batch_s) if self._recent_batch_s else 1.0
        batches = len(self.queue) / max(1, self.config.batch_size) / max(1, len(self.slots))
        return max(1, math.ceil(batches * mean_batch_s))

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **self.config.to_dict(),
            "status": "ready" if self.slots and self.is_accepting
            else ("draining" if not self.is_accepting else "no workers"),
            "queue_depth": len(self.queue),
            "in_flight_requests": self.in_flight_requests,
            "in_flight_batches": self.in_flight_batches,
            "worker_processes": [self._describe_slot(s, now) for s in self.slots],
            "num_workers": len(self.slots),
        }

    def _describe_slot(self, slot: WorkerSlot, now: float) -> dict[str, Any]:
        busy = slot.busy_seconds + (now - slot.busy_since if slot.busy_since is not None else 0.0)
        return {
            "index": slot.index, "pid": slot.process.pid, "device": slot.process.spec.device,
            "alive": slot.process.is_alive,
            "busy": slot.busy_since is not None, "busy_fraction_10s": round(slot.busy_fraction(now), 4),
            "busy_seconds": round(busy, 4), "batches": slot.num_batches, "requests": slot.num_requests,
            "cpu_seconds": cpu_seconds(slot.process.pid),
        }

    def _count(self, status: str, num: int = 1) -> None:
        if self.metrics:
            self.metrics.requests.labels(self.config.name, status).inc(num)
            if status == "rejected":
                self.metrics.rejected.labels(self.config.name).inc(num)

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.config.name).set(len(self.queue))

    def _observe_batch_start(self, batch: list[PendingRequest], now: float) -> None:
        if not self.metrics:
            return
        self.metrics.batch_size.labels(self.config.name).observe(len(batch))
        queue_hist = self.metrics.queue_seconds.labels(self.config.name)
        for request in batch:
            queue_hist.observe(now - request.arrival)
        self.metrics.queue_depth.labels(self.config.name).set(len(self.queue))

