"""BatchQueue: batches leave by size, by the oldest request's delay (from its arrival), or at once when idle."""

from __future__ import annotations

import asyncio
import time

import pytest

from loom.batching.batcher import BatchQueue, DeadlineExceeded, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_full_batch_leaves_at_once():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=3, max_batch_delay_s=10.0)
        for i in range(4):
            queue.put(i, timeout_s=60)
        start = time.monotonic()
        batch = await queue.next_batch(in_flight=1)
        return [r.payload for r in batch], time.monotonic() - start, len(queue)

    payloads, waited, left = run(body())
    assert payloads == [0, 1, 2]
    assert waited < 0.05
    assert left == 1


def test_delay_counts_from_oldest_arrival_not_from_collection():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=8, max_batch_delay_s=0.3)
        first = queue.put("a", timeout_s=60)
        await asyncio.sleep(0.2)  # the worker is busy elsewhere for 200 ms
        queue.put("b", timeout_s=60)
        batch = await queue.next_batch(in_flight=1)
        return first.arrival, time.monotonic(), [r.payload for r in batch]

    arrival, left_at, payloads = run(body())
    assert payloads == ["a", "b"]
    # Leaves 300 ms after the oldest ARRIVAL (not 300 ms after next_batch started, which would be ~500 ms).
    assert 0.29 <= left_at - arrival < 0.45


def test_lone_request_on_idle_model_is_not_held():
    async def body(in_flight: int):
        queue = BatchQueue(max_size=10, batch_size=8, max_batch_delay_s=0.25)
        queue.put("x", timeout_s=60)
        start = time.monotonic()
        await queue.next_batch(in_flight=in_flight)
        return time.monotonic() - start

    assert run(body(in_flight=0)) < 0.05
    assert run(body(in_flight=1)) >= 0.24  # something is running: wait for company, up to the delay


def test_idle_dispatch_can_be_turned_off():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=8, max_batch_delay_s=0.2, dispatch_when_idle=False)
        queue.put("x", timeout_s=60)
        start = time.monotonic()
        await queue.next_batch(in_flight=0)
        return time.monotonic() - start

    assert run(body()) >= 0.19


def test_new_request_wakes_a_waiting_worker_and_fills_the_batch():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=2, max_batch_delay_s=5.0)
        queue.put("a", timeout_s=60)
        waiter = asyncio.create_task(queue.next_batch(in_flight=1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        queue.put("b", timeout_s=60)
        return [r.payload for r in await asyncio.wait_for(waiter, 1.0)]

    assert run(body()) == ["a", "b"]


def test_bound_raises_queue_full():
    async def body():
        queue = BatchQueue(max_size=2, batch_size=8, max_batch_delay_s=0.0)
        queue.put(1, timeout_s=60)
        queue.put(2, timeout_s=60)
        with pytest.raises(QueueFull):
            queue.put(3, timeout_s=60)
        return len(queue)

    assert run(body()) == 2


def test_expired_request_gets_deadline_error_and_never_runs():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=8, max_batch_delay_s=0.0)
        stale = queue.put("stale", timeout_s=0.01)
        await asyncio.sleep(0.05)
        fresh = queue.put("fresh", timeout_s=60)
        batch = await queue.next_batch(in_flight=1)
        with pytest.raises(DeadlineExceeded):
            stale.future.result()
        return batch, fresh

    batch, fresh = run(body())
    assert batch == [fresh]


def test_should_stop_returns_empty_batch():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=8, max_batch_delay_s=0.0)
        stop = [False]
        waiter = asyncio.create_task(queue.next_batch(in_flight=0, should_stop=lambda: stop[0]))
        await asyncio.sleep(0.02)
        stop[0] = True
        queue.notify()
        return await asyncio.wait_for(waiter, 1.0)

    assert run(body()) == []


def test_full_only_waits_for_a_full_batch_and_the_predicate():
    async def body():
        queue = BatchQueue(max_size=10, batch_size=2, max_batch_delay_s=0.0)
        allowed, done = [False], [False]
        queue.put("a", timeout_s=60)
        waiter = asyncio.create_task(queue.next_batch(0, lambda: done[0], full_only=lambda: allowed[0]))
        await asyncio.sleep(0.02)
        assert not waiter.done()  # one request is not a full batch, even with zero delay
        queue.put("b", timeout_s=60)
        await asyncio.sleep(0.02)
        assert not waiter.done()  # full, but the predicate (every worker busy) says no
        allowed[0] = True
        queue.notify()
        return [r.payload for r in await asyncio.wait_for(waiter, 1.0)]

    assert run(body()) == ["a", "b"]
