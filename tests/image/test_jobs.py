"""The job queue: order, progress with previews, cancel (queued and running), history with files, failures."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from loom.image.jobs import CANCELLED, FAILED, SUCCEEDED, JobQueue, QueueFull
from loom.image.metadata import read_settings
from loom.image.request import ImageRequest


@pytest.fixture()
def queue(engine, tmp_path):
    q = JobQueue(engine, tmp_path / "out", max_queued=4, preview_interval_s=0.0)
    q.start()
    yield q
    q.stop(drain=False)


def req(**kw) -> ImageRequest:
    return ImageRequest(**({"prompt": "a sneaker", "seed": 1, "steps": 3, "width": 64, "height": 64} | kw))


def test_jobs_run_in_submission_order_with_progress_and_files(queue):
    jobs = [queue.submit(req(seed=s)) for s in (1, 2, 3)]
    for job in jobs:
        queue.wait(job.id, timeout=60)
    assert [j.status for j in jobs] == [SUCCEEDED] * 3
    assert jobs[0].finished <= jobs[1].started and jobs[1].finished <= jobs[2].started
    assert (jobs[0].step, jobs[0].total_steps) == (3, 3)
    assert Image.open(__import__("io").BytesIO(jobs[0].preview_png)).size == (64, 64)
    assert [read_settings(p)["seed"] for p in jobs[2].files] == [3]
    history = queue.jobs(finished_only=True)
    assert [j.id for j in history] == [j.id for j in reversed(jobs)]
    assert (queue.output_dir / "history.jsonl").read_text().count("\n") == 3


def test_cancel_a_queued_job_drops_it(queue):
    gate = threading.Event()
    blocker = queue.submit(req(steps=3))
    original = queue.engine.generate

    def slow_generate(request, on_step=None, should_stop=None):
        gate.wait(30)
        return original(request, on_step=on_step, should_stop=should_stop)

    queue.engine.generate = slow_generate
    try:
        waiting = queue.submit(req(seed=9))
        assert queue.cancel(waiting.id).status == CANCELLED
        gate.set()
        queue.wait(blocker.id, timeout=60)
    finally:
        del queue.engine.generate
    assert waiting.started is None and not waiting.files


def test_cancel_a_running_job_stops_within_one_step(queue):
    calls = []
    unet = queue.engine.txt2img.unet
    job = None

    def on_forward(*_):
        calls.append(1)
        if len(calls) == 2:
            queue.cancel(job.id)

    hook = unet.register_forward_hook(on_forward)
    try:
        job = queue.submit(req(steps=30))
        queue.wait(job.id, timeout=60)
    finally:
        hook.remove()
    assert job.status == CANCELLED
    assert len(calls) == 2 and job.step == 2 and not job.files


def test_a_failing_job_does_not_stop_the_worker(queue):
    bad = queue.submit(req(styles=[]))
    bad.request.styles = ["No Such Style"]  # fails inside the worker
    good = queue.submit(req(seed=4))
    queue.wait(good.id, timeout=60)
    assert bad.status == FAILED and "No Such Style" in bad.error
    assert good.status == SUCCEEDED


def test_queue_full_and_stopped_queue(engine, tmp_path):
    q = JobQueue(engine, tmp_path, max_queued=1)
    with pytest.raises(RuntimeError, match="not running"):
        q.submit(req())
    q._running = True  # accept without a worker, to fill the queue
    q.submit(req())
    with pytest.raises(QueueFull):
        q.submit(req())
    with pytest.raises(ValueError, match="max_queued"):
        JobQueue(engine, tmp_path, max_queued=0)
