"""`loom bench load`: does dynamic batching help on this machine, and when does adding workers stop helping?

Sweeps batch size x workers against one model at a fixed client concurrency and records, per cell, requests/s,
p50/p99 latency, mean batch size, worker busy fraction and CPU cores used (server + workers), to CSV, JSON and a
PNG plot. By default it starts its own `loom serve --model-server` and drives it through the management API;
``--url/--management-url/--management-token`` point it at a running server instead.

    loom bench load --serve minilm=embedding --batch-sizes 1,8,32 --workers 1,2,4 --concurrency 32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import re
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from loom.batching.config import parse_serve_spec
from loom.bench.load_client import json_payloads, run_load, sentences
from loom.bench.process import ServerProcess, free_port, start_server


@dataclass(slots=True)
class Cell:
    workers: int
    batch_size: int
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: float
    busy_fraction: float
    cpu_cores: float
    errors: int
    requests: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve", default="minilm=embedding", metavar="NAME=HANDLER[:PATH]",
                        help="the model to load-test (default minilm=embedding, the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (default 2)")
    parser.add_argument("--max-batch-delay", type=float, default=5.0, help="ms (default 5)")
    parser.add_argument("--payload-file", help="send this file's bytes as every request body (custom handlers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_load", help="output prefix: writes PREFIX.csv/.json/.png")
    parser.add_argument("--url", help="a running server's base URL (default: start one)")
    parser.add_argument("--management-url", help="its management URL (with --url)")
    parser.add_argument("--management-token", help="its management token (with --url)")


def run(args: argparse.Namespace) -> int:
    config = parse_serve_spec(args.serve)
    batch_sizes, worker_counts = _int_list(args.batch_sizes, "--batch-sizes"), _int_list(args.workers, "--workers")
    content_type, payloads = _payloads(config.handler, args)
    # SIGTERM becomes SystemExit so the server we started is stopped on the way out; the caller's handler comes back
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with _server(args) as (url, mgmt, token):
            cells = asyncio.run(_sweep(url, mgmt, token, config, batch_sizes, worker_counts, payloads, content_type,
                                       args))
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta = {"model": args.serve, "concurrency": args.concurrency, "duration_s": args.duration,
            "max_batch_delay_ms": args.max_batch_delay, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    paths = write_results(cells, meta, Path(args.out))
    best = max(cells, key=lambda c: c.requests_per_s)
    print(f"loom bench load {args.serve}: best {best.requests_per_s:.1f} req/s at batch {best.batch_size} x "
          f"{best.workers} workers (p99 {best.p99_ms:.0f} ms); wrote {', '.join(str(p) for p in paths)}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers like 1,8,32; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs positive integers; got {text!r}")
    return values


def _payloads(handler: str, args: argparse.Namespace) -> tuple[str, list[bytes]]:
    if args.payload_file:
        return "application/octet-stream", [Path(args.payload_file).read_bytes()]
    if handler == "image-classifier":
        return "image/png", [_png(args.seed + i) for i in range(16)]
    return "application/json", json_payloads(sentences(512, seed=args.seed))


def _png(seed: int, size: int = 224) -> bytes:
    from PIL import Image  # local: `loom bench --help` imports this module; only image payloads need PIL

    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _server:
    """Use the given server, or start `loom serve --model-server` on free loopback ports and stop it after."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.process: ServerProcess | None = None

    def __enter__(self) -> tuple[str, str, str]:
        a = self.args
        if a.url:
            if not (a.management_url and a.management_token):
                raise ValueError("--url needs --management-url and --management-token too")
            return a.url.rstrip("/"), a.management_url.rstrip("/"), a.management_token
        # hex, and passed with "=": a urlsafe token starting with "-" was read by argparse as a flag (a flaky test)
        port, mport, token = free_port(), free_port(), secrets.token_hex(16)
        cmd = [sys.executable, "-m", "loom.cli", "serve", "--model-server", "--enable-model-api", "--port", str(port),
               "--management-port", str(mport), f"--management-token={token}", "--log-level", "warning"]
        self.process = start_server(cmd, f"http://127.0.0.1:{port}", ready_path="/ping", timeout=120)
        return self.process.url, f"http://127.0.0.1:{mport}", token

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stop(grace=60)


async def _sweep(url, mgmt, token, config, batch_sizes, worker_counts, payloads, content_type, args) -> list[Cell]:
    auth = {"Authorization": f"Bearer {token}"}
    name = f"bench-{config.name}"
    target = f"{url}/predictions/{name}"
    cells = []
    async with httpx.AsyncClient(headers=auth, timeout=600) as client:
        settings = {"name": name, "handler": config.handler, "path": config.path, "batch_size": batch_sizes[0],
                    "max_batch_delay": args.max_batch_delay, "workers": worker_counts[0],
                    "max_queue_size": max(256, 4 * args.concurrency)}
        _check(await client.post(f"{mgmt}/models", json=settings))
        try:
            for workers in worker_counts:
                _check(await client.put(f"{mgmt}/models/{name}", json={"workers": workers}))
                for batch_size in batch_sizes:
                    _check(await client.put(f"{mgmt}/models/{name}", json={"batch_size": batch_size}))
                    cell = await _measure(client, url, mgmt, name, target, payloads, content_type, workers,
                                          batch_size, args)
                    print(f"  workers {workers} batch {batch_size:>3}: {cell.requests_per_s:8.1f} req/s  "
                          f"p50 {cell.p50_ms:7.1f} ms  p99 {cell.p99_ms:7.1f} ms  batch {cell.mean_batch_size:5.1f}  "
                          f"busy {cell.busy_fraction:.2f}  cpu {cell.cpu_cores:.2f} cores", flush=True)
                    cells.append(cell)
        finally:
            await client.delete(f"{mgmt}/models/{name}")
    return cells


async def _measure(client, url, mgmt, name, target, payloads, content_type, workers, batch_size, args) -> Cell:
    if args.warmup > 0:
        await run_load(target, payloads, args.concurrency, duration_s=args.warmup, content_type=content_type)
    before, cpu_before, t0 = await _snapshot(client, url, mgmt, name)
    stats = await run_load(target, payloads, args.concurrency, duration_s=args.duration, content_type=content_type)
    after, cpu_after, t1 = await _snapshot(client, url, mgmt, name)
    elapsed = t1 - t0
    busy = sum(after[i]["busy_seconds"] - before[i]["busy_seconds"] for i in after if i in before)
    batches = sum(after[i]["batches"] - before[i]["batches"] for i in after if i in before)
    served = sum(after[i]["requests"] - before[i]["requests"] for i in after if i in before)
    cpu = sum(cpu_after[p] - cpu_before[p] for p in cpu_after if p in cpu_before)
    return Cell(workers, batch_size, args.concurrency, stats.requests_per_s, stats.p50_ms, stats.p99_ms,
                round(served / batches, 2) if batches else 0.0, round(busy / (workers * elapsed), 3),
                round(cpu / elapsed, 3), stats.errors, stats.requests)


_CPU_LINE = re.compile(r'^loom_model_process_cpu_seconds_total\{process="([^"]+)"\} ([0-9.e+-]+)$', re.M)


async def _snapshot(client, url, mgmt, name) -> tuple[dict, dict, float]:
    described = _check(await client.get(f"{mgmt}/models/{name}")).json()
    metrics = (await client.get(f"{url}/metrics")).text
    workers = {w["index"]: w for w in described["worker_processes"]}
    cpu = {proc: float(value) for proc, value in _CPU_LINE.findall(metrics)}
    return workers, cpu, time.monotonic()


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url} -> "
                           f"{response.status_code}: {response.text}")
    return response


def write_results(cells: list[Cell], meta: dict, prefix: Path) -> list[Path]:
    """PREFIX.csv (one row per cell), PREFIX.json (meta + cells) and PREFIX.png (three panels)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(c) for c in cells]
    csv_path, json_path, png_path = (prefix.with_suffix(s) for s in (".csv", ".json", ".png"))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta, "cells": rows}, indent=2) + "\n")
    plot(cells, meta, png_path)
    return [csv_path, json_path, png_path]


def plot(cells: list[Cell], meta: dict, path: Path) -> None:
    # local: matplotlib takes ~0.3 s to import and only plots need it; pyplot must come after use("Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("requests_per_s", "requests/s"), ("p99_ms", "p99 latency (ms)"),
              ("busy_fraction", "worker busy fraction"))
    for ax, (field, label) in zip(axes, panels):
        for workers in sorted({c.workers for c in cells}):
            line = sorted((c for c in cells if c.workers == workers), key=lambda c: c.batch_size)
            ax.plot([c.batch_size for c in line], [getattr(c, field) for c in line], marker="o",
                    label=f"{workers} workers")
        ax.set_xscale("log", base=2)
        sizes = sorted({c.batch_size for c in cells})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("max batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"loom bench load: {meta['model']}, {meta['concurrency']} clients, "
                 f"delay {meta['max_batch_delay_ms']} ms, "
                 f"{meta['cpu_count']} CPUs ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
