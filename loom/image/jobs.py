"""The image job queue: one worker thread runs jobs in submission order, with per-step progress, previews,
cancellation and a history of finished jobs and their files.

    queue = JobQueue(engine, output_dir="outputs/images")
    queue.start()
    job = queue.submit(ImageRequest(prompt="a sneaker"))
    queue.wait(job.id, timeout=60); job.files       # [Path(".../<id>/0.png")]
    queue.cancel(job.id)                             # queued: dropped; running: stops after the current step
    queue.stop()

Progress is observable by polling (``job.snapshot()``) or by waiting for the next change: from a thread with
``job.wait_change(version, timeout)``, from the event loop with ``await job.changed(version, timeout)`` (which holds
no thread, so any number of SSE streams can wait), which the HTTP API turns into server-sent events.

Retention: the newest ``keep_jobs`` finished jobs are kept; an older job's folder of PNGs goes when it leaves the
history, ``history.jsonl`` (mode 0600) keeps as many lines, and ``start()`` prunes what an earlier run left over.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loom.image.engine import ImageEngine, JobCancelled
from loom.image.metadata import save_png
from loom.image.request import ImageRequest

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
HISTORY = "history.jsonl"
JOB_FOLDER = re.compile(r"^[0-9a-f]{16}$")


class QueueFull(Exception):
    """Raised by ``submit`` when ``max_queued`` jobs already wait; the API answers 503 with Retry-After."""


@dataclass(slots=True)
class Job:
    id: str
    request: ImageRequest
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    preview_png: bytes | None = None
    files: list[Path] = field(default_factory=list)
    settings: list[dict] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    version: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _waiters: list = field(default_factory=list, repr=False)
    """(event loop, future) of every ``changed()`` awaiting the next change."""

    def snapshot(self) -> dict:
        """JSON-able state (no image bytes)."""
        return {
            "id": self.id, "task": self.request.task, "status": self.status, "prompt": self.request.prompt,
            "created": self.created, "started": self.started, "finished": self.finished,
            "progress": {"step": self.step, "total": self.total_steps},
            "files": [p.name for p in self.files], "settings": self.settings, "error": self.error,
            "version": self.version,
        }

    def touch(self, **changes) -> None:
        """Apply ``changes`` and wake every waiter."""
        with self._cond:
            for key, value in changes.items():
                setattr(self, key, value)
            self.version += 1
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that event loop has closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until ``self.version`` differs from ``version`` (or timeout); returns the current version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != version, timeout=timeout)
            return self.version

    async def changed(self, version: int, timeout: float) -> int:
        """``wait_change`` for the event loop: awaits the next change (or timeout) without holding a thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self.version != version:
                return self.version
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
        return self.version

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED


class JobQueue:
    def __init__(self, engine: ImageEngine, output_dir: str | Path, max_queued: int = 32, keep_jobs: int = 200,
                 preview_interval_s: float = 0.2, metrics=None):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        if keep_jobs < 1:
            raise ValueError(f"keep_jobs must be >= 1, got {keep_jobs}")
        self.engine = engine
        self.output_dir = Path(output_dir)
        self.max_queued = max_queued
        self.keep_jobs = keep_jobs
        self.preview_interval_s = preview_interval_s
        self.metrics = metrics
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self.prune()
        self._running = True
        self._thread = threading.Thread(target=self._worker, name="loom-image-worker", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Finish the running job (and, with ``drain``, the queued ones), then end the worker."""
        with self._cond:
            if not drain:
                for job in list(self._pending):
                    self._finish(job, CANCELLED)
                self._pending.clear()
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------ API
    def submit(self, request: ImageRequest) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], request=request)
        with self._cond:
            if not self._running:
                raise RuntimeError("the image queue is not running (start() it, or the server is shutting down)")
            if len(self._pending) >= self.max_queued:
                raise QueueFull(f"{len(self._pending)} image jobs are already queued; retry later")
            self._jobs[job.id] = job
            self._pending.append(job)
            self._trim_history()
            self._cond.notify_all()
        self._observe_depth()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, finished_only: bool = False) -> list[Job]:
        """Newest first."""
        jobs = list(reversed(self._jobs.values()))
        return [j for j in jobs if j.is_finished] if finished_only else jobs

    def cancel(self, job_id: str) -> Job | None:
        """Queued: removed at once. Running: stops after the step in progress. Finished: unchanged."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.is_finished:
                return job
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, CANCELLED)
            else:
                job.touch(cancel_requested=True)
        self._observe_depth()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self._jobs[job_id]
        deadline = None if timeout is None else time.monotonic() + timeout
        version = -1
        while not job.is_finished:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            version = job.wait_change(version, min(left, 1.0))
        return job

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ worker
    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or not self._running)
                if not self._pending:
                    return
                job = self._pending.popleft()
                self.current = job
            self._observe_depth()
            try:
                self._run(job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        job.touch(status=RUNNING, started=time.time())
        last_preview = [0.0]

        def on_step(done: int, total: int, latents) -> None:
            now = time.monotonic()
            changes = {"step": done, "total_steps": total}
            if now - last_preview[0] >= self.preview_interval_s or done == total:
                last_preview[0] = now
                changes["preview_png"] = _png(self.engine.preview(latents))
            job.touch(**changes)
            if self.metrics:
                self.metrics.steps.inc()

        try:
            result = self.engine.generate(job.request, on_step=on_step, should_stop=lambda: job.cancel_requested)
        except JobCancelled:
            self._finish(job, CANCELLED)
            return
        except Exception as exc:  # a bad job must not kill the worker
            self._finish(job, FAILED, error=f"{type(exc).__name__}: {exc}")
            return
        folder = self.output_dir / job.id
        files = [save_png(img, folder / f"{i}.png", s)
                 for i, (img, s) in enumerate(zip(result.images, result.settings))]
        self._finish(job, SUCCEEDED, files=files, settings=result.settings)

    def _finish(self, job: Job, status: str, **changes) -> None:
        changes |= {"status": status, "finished": time.time()}
        if status == SUCCEEDED:
            self._append_history(job, changes)  # before waking waiters: a finished job is always in the history
        if self.metrics:  # before waking waiters too: a client that saw the job finish finds it counted
            self.metrics.jobs.labels(task=job.request.task, status=status).inc()
            if job.started:
                self.metrics.seconds.labels(task=job.request.task).observe(changes["finished"] - job.started)
        job.touch(**changes)

    def _append_history(self, job: Job, changes: dict) -> None:
        record = job.snapshot() | changes | {"files": [p.name for p in changes.get("files", [])],
                                             "folder": str(self.output_dir / job.id)}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.output_dir / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # prompts are the users' data: owner only, even if the file existed
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._prune_history()

    def _trim_history(self) -> None:
        """Drop the oldest finished jobs past ``keep_jobs``, and their files."""
        while sum(j.is_finished for j in self._jobs.values()) > self.keep_jobs:
            oldest = next(k for k, j in self._jobs.items() if j.is_finished)
            del self._jobs[oldest]
            _remove_job_folder(self.output_dir / oldest)

    def prune(self) -> None:
        """Keep the newest ``keep_jobs`` lines of history.jsonl and only their job folders (what earlier runs left)."""
        kept = self._prune_history()
        if not self.output_dir.is_dir():
            return
        live = kept | set(self._jobs)
        for folder in self.output_dir.iterdir():
            if JOB_FOLDER.match(folder.name) and folder.name not in live:
                _remove_job_folder(folder)

    def _prune_history(self) -> set[str]:
        """Rewrite history.jsonl with its newest ``keep_jobs`` lines (atomically, 0600); the ids kept."""
        path = self.output_dir / HISTORY
        if not path.is_file() or path.is_symlink():
            return set()
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = lines[-self.keep_jobs:]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{HISTORY}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            for line in lines[: len(lines) - len(kept)]:
                _remove_job_folder(self.output_dir / _job_id(line))
        return {_job_id(line) for line in kept}

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queued.set(len(self._pending))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _job_id(line: str) -> str:
    try:
        return str(json.loads(line).get("id", ""))
    except (ValueError, AttributeError):
        return ""


def _remove_job_folder(folder: Path) -> None:
    """A job's folder of result PNGs; anything else (a folder the user put there) is left alone."""
    if not JOB_FOLDER.match(folder.name) or not folder.is_dir() or folder.is_symlink():
        return
    if all(p.is_file() and p.suffix == ".png" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
