"""A lean closed-loop HTTP/1.1 load client: N keep-alive connections, each sending its next request when the last
answer arrives. Written on raw asyncio streams so that on a small machine the client costs far less CPU than the
server it measures; every server (Loom, TorchServe, LitServe) is measured with this same client.

    stats = asyncio.run(run_load("http://127.0.0.1:8000/predictions/minilm", payloads, concurrency=32, duration_s=10))
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

WORDS = ("model server batch queue worker latency request answer token vector sentence embedding cosine fast slow "
         "machine learning python process thread memory cache network client window delay arrival oldest idle busy "
         "metric histogram scale drain register handler image label score tensor float matrix kernel core socket "
         "river mountain city garden music coffee morning winter summer yellow quiet bright ancient simple").split()


def sentences(count: int, seed: int = 0, min_words: int = 6, max_words: int = 14) -> list[str]:
    """Seeded English-like sentences (6-14 words, about 10-20 tokens each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
            for _ in range(count)]


@dataclass(slots=True)
class LoadStats:
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    server_p50_ms: float | None = None
    """p50 of the timing header's value (for Loom: the worker's handler time), when one was asked for."""
    overhead_p50_ms: float | None = None
    """p50 over requests of (client latency - timing header): everything but the model."""

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Connection:
    """One keep-alive connection: send a request, read the answer (Content-Length or chunked)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            await self.close()
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        headers = await self._headers()
        payload = await self._body(headers)
        if headers.get("connection") == "close":
            await self.close()
        return status, headers, payload

    async def _headers(self) -> dict[str, str]:
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        return headers

    async def _body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            return b"".join(parts)
        return await self.reader.read()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


def _request_bytes(url: str, body: bytes, content_type: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return parts.hostname, parts.port or 80, head


async def run_load(url: str, payloads: list[bytes], concurrency: int, duration_s: float | None = None,
                   num_requests: int | None = None, content_type: str = "application/json",
                   warmup_s: float = 0.0, timing_header: str | None = None) -> LoadStats:
    """Closed loop: `concurrency` connections post payloads (cycled) until duration_s or num_requests is reached.

    Requests finishing during the first warmup_s seconds are not counted. timing_header names a response header
    holding the server's own milliseconds for the request (Loom: x-loom-inference-ms), to split latency.
    """
    if (duration_s is None) == (num_requests is None):
        raise ValueError("pass exactly one of duration_s or num_requests")
    if concurrency < 1 or not payloads:
        raise ValueError("concurrency must be >= 1 and payloads non-empty")
    host, port, _ = _request_bytes(url, b"", content_type)
    requests = [(_request_bytes(url, p, content_type)[2], p) for p in payloads]
    cycle = itertools.cycle(requests)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    server_ms: list[tuple[float, float]] = []  # (latency s, header ms)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = None if duration_s is None else measure_from + duration_s
    remaining = [num_requests] if num_requests is not None else None

    async def client() -> None:
        conn = _Connection(host, port)
        try:
            while True:
                if remaining is not None:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                elif time.perf_counter() >= stop_at:
                    return
                head, body = next(cycle)
                t0 = time.perf_counter()
                headers: dict[str, str] = {}
                try:
                    status, headers, _ = await conn.request(head, body)
                except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
                    status = 599
                    await conn.close()
                t1 = time.perf_counter()
                if t1 >= measure_from:
                    latencies.append(t1 - t0)
                    if timing_header and timing_header in headers:
                        server_ms.append((t1 - t0, float(headers[timing_header])))
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - max(start, measure_from)
    stats = _stats(latencies, statuses, elapsed)
    if server_ms:
        stats.server_p50_ms = round(percentile(sorted(ms for _, ms in server_ms), 50), 3)
        stats.overhead_p50_ms = round(percentile(sorted(lat * 1000 - ms for lat, ms in server_ms), 50), 3)
    return stats


def _stats(latencies: list[float], statuses: dict[str, int], elapsed: float) -> LoadStats:
    ordered = sorted(latencies)
    ok = statuses.get("200", 0)
    ms = [x * 1000 for x in ordered]
    return LoadStats(
        requests=ok, errors=len(ordered) - ok, seconds=round(elapsed, 3),
        requests_per_s=round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        p50_ms=round(percentile(ms, 50), 3), p90_ms=round(percentile(ms, 90), 3), p99_ms=round(percentile(ms, 99), 3),
        mean_ms=round(sum(ms) / len(ms), 3) if ms else float("nan"), statuses=statuses,
    )


def json_payloads(texts: list[str], key: str = "text") -> list[bytes]:
    return [json.dumps({key: t}).encode() for t in texts]
