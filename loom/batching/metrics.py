"""Prometheus metrics of the model server, registered in the app's shared registry (one /metrics for all).

Counters and histograms are updated by :mod:`loom.batching.model`; a collector reads, at scrape time, each
worker's busy fraction over the last 10 s, the CPU seconds of the server and worker processes and, when
``pynvml`` is importable and a GPU is present, GPU utilisation and memory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BatchingMetrics:
    def __init__(self, registry: CollectorRegistry, models: Callable[[], Iterable] = list):
        self.requests = Counter("loom_model_requests", "Model-server requests by final status "
                                "(ok, bad_request, error, timeout, rejected)", ["model", "status"], registry=registry)
        self.queue_seconds = Histogram("loom_model_queue_seconds", "Time from arrival to leaving the queue in a batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("loom_model_batch_size", "Requests per inference call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("loom_model_inference_seconds",
                                           "Handler time per batch (decode to postprocess)",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("loom_model_queue_depth", "Requests waiting in the model's queue", ["model"],
                                 registry=registry)
        self.rejected = Counter("loom_model_rejected", "Requests refused with 503 because the queue was full",
                                ["model"], registry=registry)
        registry.register(_RuntimeCollector(models))


class _RuntimeCollector:
    """Scrape-time gauges: worker busy fraction, process CPU, GPU (NVML) when present."""

    def __init__(self, models: Callable[[], Iterable]):
        self._models = models
        self._nvml = _nvml_handles()

    def describe(self):
        return []

    def collect(self):
        now = time.monotonic()
        busy = GaugeMetricFamily("loom_model_worker_busy_fraction",
                                 "Share of the last 10 s a worker spent running batches", labels=["model", "worker"])
        cpu = CounterMetricFamily("loom_model_process_cpu_seconds",
                                  "CPU seconds (user+system) of the server and its workers", labels=["process"])
        cpu.add_metric(["server"], cpu_seconds(os.getpid()) or 0.0)
        for model in self._models():
            for slot in model.slots:
                busy.add_metric([model.config.name, str(slot.index)], slot.busy_fraction(now))
                cpu.add_metric([f"{model.config.name}/{slot.index}"], cpu_seconds(slot.process.pid) or 0.0)
        yield busy
        yield cpu
        yield from self._gpu()

    def _gpu(self):
        if not self._nvml:
            return
        import pynvml  # optional: nvidia-ml-py is installed only where there are NVIDIA GPUs

        util = GaugeMetricFamily("loom_model_gpu_utilization_ratio", "GPU busy share (NVML)", labels=["gpu"])
        mem = GaugeMetricFamily("loom_model_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        for i, handle in enumerate(self._nvml):
            with contextlib.suppress(Exception):
                util.add_metric([str(i)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
                mem.add_metric([str(i)], pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        yield util
        yield mem


def _nvml_handles() -> list:
    try:
        import pynvml  # optional: nvidia-ml-py is installed only where there are NVIDIA GPUs

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no pynvml, no driver or no GPU: no GPU metrics
        return []


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(Exception):
        import psutil  # local: `loom serve` imports this module for every command line; only scrapes need psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    return None
