"""The per-model queue and the batching rule.

A batch leaves the queue when it is full (``batch_size`` requests), when the OLDEST waiting request has waited
``max_batch_delay`` since it arrived, or at once when a lone request finds the model idle (nothing in flight).
Requests whose deadline passed while they waited are answered 504 and never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The model's queue is at max_queue_size; the caller should answer 503 with Retry-After."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it ran (504)."""


@dataclass(slots=True, eq=False)
class PendingRequest:
    payload: Any
    arrival: float
    """time.monotonic() when the request was queued."""
    deadline: float
    future: asyncio.Future = field(repr=False)
    dequeued_at: float | None = None
    inference_s: float | None = None
    """Handler seconds of the batch that carried this request (set when it returns)."""


class BatchQueue:
    """A bounded FIFO that hands out batches by size, by the oldest request's delay, or at once when idle."""

    def __init__(self, max_size: int, batch_size: int, max_batch_delay_s: float, dispatch_when_idle: bool = True):
        self.max_size = max_size
        self.batch_size = batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.dispatch_when_idle = dispatch_when_idle
        self._items: deque[PendingRequest] = deque()
        self._waiters: list[asyncio.Future] = []

    def __len__(self) -> int:
        return len(self._items)

    def put(self, payload: Any, timeout_s: float) -> PendingRequest:
        if len(self._items) >= self.max_size:
            raise QueueFull(f"queue holds {len(self._items)} requests (max_queue_size={self.max_size})")
        now = time.monotonic()
        request = PendingRequest(payload, now, now + timeout_s, asyncio.get_running_loop().create_future())
        self._items.append(request)
        self.notify()
        return request

    def remove(self, request: PendingRequest) -> bool:
        """Take a still-waiting request out (its caller gave up); False if a worker already took it."""
        try:
            self._items.remove(request)
        except ValueError:
            return False
        return True

    def notify(self) -> None:
        """Wake every waiting worker loop (new request, settings changed, a worker asked to stop)."""
        # NOTE: hand each current waiter its own future to settle, so every current waiter wakes and no later
        # waiter sees a stale flag.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _settle(waiter)

    async def next_batch(self, in_flight: int, should_stop=lambda: False, full_only=None) -> list[PendingRequest]:
        """Wait for and pop the next batch; [] when should_stop() turned true (checked after every notify).

        in_flight: batches running now. full_only: a predicate; when given, only a full batch leaves, and only
        while full_only() holds (used to queue a worker's next batch while it is still busy).
        """
        while not should_stop():
            self._expire(time.monotonic())
            if full_only is not None:
                wait_s = 0.0 if len(self._items) >= self.batch_size and full_only() else None
            else:
                wait_s = self._wait_before_dispatch(time.monotonic(), in_flight)
            if wait_s == 0.0:
                return self._pop()
            await self._wait_changed(wait_s)
        return []

    def take_ready(self, in_flight: int) -> list[PendingRequest]:
        """Pop a batch now if the batching rule lets one leave now (else []): the caller's shortcut past a wake-up."""
        now = time.monotonic()
        self._expire(now)
        return self._pop() if self._wait_before_dispatch(now, in_flight) == 0.0 else []

    async def _wait_changed(self, timeout_s: float | None) -> None:
        """Until the next notify() or timeout_s seconds (None: no timeout)."""
        # NOTE: a bare future and a timer instead of asyncio.wait_for(event.wait()), which in Python 3.11 wraps the
        # wait in a new task per call: the worker loop wakes one event-loop iteration sooner.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout_s is None else loop.call_later(timeout_s, _settle, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):  # woken by the timer (or cancelled): still listed
                self._waiters.remove(waiter)

    def _wait_before_dispatch(self, now: float, in_flight: int) -> float | None:
        """0.0: dispatch now; None: wait for a request; else seconds until the oldest request's window closes."""
        if not self._items:
            return None
        if len(self._items) >= self.batch_size:
            return 0.0
        if self.dispatch_when_idle and in_flight == 0 and len(self._items) == 1:
            return 0.0
        remaining = self._items[0].arrival + self.max_batch_delay_s - now
        return 0.0 if remaining <= 0 else remaining

    def _pop(self) -> list[PendingRequest]:
        now = time.monotonic()
        batch = [self._items.popleft() for _ in range(min(self.batch_size, len(self._items)))]
        for request in batch:
            request.dequeued_at = now
        return batch

    def _expire(self, now: float) -> None:
        while self._items and self._items[0].deadline <= now:
            request = self._items.popleft()
            if not request.future.done():
                request.future.set_exception(DeadlineExceeded("request waited past its deadline in the queue"))
        # Later requests may have shorter deadlines only if timeouts changed; they are caught when they reach the head.


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
