"""Helpers shared by the model-server benchmarks: the MiniLM workload, a measured load run, CPU seconds of a server's
session, timing of the model itself in-process (servers start with loom.bench.process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from loom.bench.load_client import json_payloads, run_load, sentences


def session_cpu_seconds(session: int | None) -> float:
    """User + system CPU seconds of every live process in a session (a server and all its workers)."""
    total = 0.0
    if session is None:
        return total
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == session:
                times = proc.cpu_times()
                total += times.user + times.system
    return total


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
