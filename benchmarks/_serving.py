"""Helpers shared by the model-server benchmarks: free ports, readiness polling, the MiniLM workload, timing of
the model itself in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loom.bench.load_client import json_payloads, run_load, sentences


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll GET url until it answers 200; raise if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def start_server(cmd: list[str], log, **kwargs) -> subprocess.Popen:
    """Start a server in its own session, its scheduling group niced like this process.

    NOTE: with autogroup scheduling (on here) the kernel shares CPU between sessions, not processes, and `nice`
    only ranks processes inside a session. A server left in the benchmark's session shares one share with the
    load client; one in a new session gets a full share. Every server therefore gets its own session, with the
    group nice of the benchmark's own session (so no server is favoured over the others or over the client).
    """
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    with contextlib.suppress(OSError, ValueError):
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(own_group_nice()))
    return proc


def session_cpu_seconds(session: int | None) -> float:
    """User + system CPU seconds of every live process in a session (a server and all its workers)."""
    import psutil

    total = 0.0
    if session is None:
        return total
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == session:
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def own_group_nice() -> int:
    """The nice of this process's scheduling group ("/autogroup-2 nice 0" → 0); 0 without autogroup."""
    try:
        return int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server (it drains), then kill whatever is left of its session."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def workload(seed: int = 0, count: int = 512) -> tuple[list[str], list[bytes]]:
    texts = sentences(count, seed=seed)
    return texts, json_payloads(texts)


TIMING_HEADER = "x-loom-inference-ms"


def measure(url: str, payloads: list[bytes], concurrency: int, duration_s: float, warmup_s: float,
            lone_requests: int, session: int | None = None) -> dict:
    """Lone-request latency on the idle server (1 client, sequential), then closed-loop throughput.

    session: the server's session id; its processes' CPU over the throughput run gives server_cpu_cores and
    requests_per_cpu_s (what a request costs, whatever share of a shared machine the server was given).
    For Loom the lone requests also give overhead_p50_ms: client latency minus the worker's handler time, per
    request, so the split does not depend on how busy the machine was at another moment.
    """
    lone = None
    if lone_requests:
        asyncio.run(run_load(url, payloads, concurrency=1, num_requests=5))  # connection and caches warm
        lone = asyncio.run(run_load(url, payloads, concurrency=1, num_requests=lone_requests,
                                    timing_header=TIMING_HEADER))
    asyncio.run(run_load(url, payloads, concurrency, duration_s=warmup_s))
    cpu_before, t0 = session_cpu_seconds(session), time.monotonic()
    stats = asyncio.run(run_load(url, payloads, concurrency, duration_s=duration_s))
    cpu = session_cpu_seconds(session) - cpu_before
    elapsed = time.monotonic() - t0
    return {**stats.to_dict(), "lone_p50_ms": lone.p50_ms if lone else None,
            "server_cpu_cores": round(cpu / elapsed, 3) if session else None,
            "requests_per_cpu_s": round(stats.requests / cpu, 2) if session and cpu > 0 else None,
            "lone_mean_ms": lone.mean_ms if lone else None,
            "lone_model_p50_ms": lone.server_p50_ms if lone else None,
            "lone_overhead_p50_ms": lone.overhead_p50_ms if lone else None}


def model_time_ms(texts: list[str], threads: int, batch_size: int = 1, repeats: int = 100,
                  embed: Callable[[list[str]], Any] | None = None) -> dict:
    """The model's own time in this process (tokenise + forward + pool), no server in between: Loom's embedding
    handler, or `embed` (a function of a list of texts) when given."""
    import torch

    torch.set_num_threads(threads)
    if embed is None:
        embed = _loom_embedding(threads)
    batches = [texts[(i * batch_size) % len(texts):][:batch_size] for i in range(repeats)]
    for batch in batches[:3]:
        embed(batch)
    times = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        t0 = time.perf_counter()
        embed(batch)
        times.append((time.perf_counter() - t0) * 1000)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"p50_ms": statistics.median(times), "mean_ms": statistics.mean(times),
            "items_per_s": repeats * batch_size / elapsed, "items_per_cpu_s": repeats * batch_size / cpu,
            "threads": threads, "batch_size": batch_size}


def _loom_embedding(threads: int) -> Callable[[list[str]], Any]:
    from loom.batching.handler import Context, run_batch
    from loom.batching.handlers.embedding import EmbeddingHandler

    handler = EmbeddingHandler()
    handler.setup(Context("minilm", None, 0, threads))
    return lambda batch: run_batch(handler, batch)


def cpu_count() -> int:
    return os.cpu_count() or 1


def cpu_flags() -> dict[str, str | bool]:
    """The CPU's model name and vector ISA as /proc/cpuinfo reports it ("AVX-512" or "AVX2"), for the record."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "isa": "unknown"}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return {"model": model, "isa": isa, "fma": "fma" in flags, "avx512_bf16": "avx512_bf16" in flags}
