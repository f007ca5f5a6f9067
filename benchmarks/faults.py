"""Fault runs: the LLM server under client disconnects and overload bursts, /health while a huge prompt is
tokenized, a finetune killed with SIGKILL and resumed, and a model-server worker killed mid-batch.

    python benchmarks/faults.py llm --requests 1000      # tiny random Llama (SmolLM2's tokenizer), in this process
    python benchmarks/faults.py health --prompt-mb 30
    python benchmarks/faults.py finetune
    python benchmarks/faults.py worker
    python benchmarks/faults.py all --out results/faults.json

Everything runs on loopback, is seeded, bounded in count and time, and stops by itself. Each run prints one summary
line and the JSON holds every figure (docs/security.md quotes them). tests/security/test_faults.py runs the same
functions and asserts on what they return.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from loom.batching.config import ModelConfig
from loom.batching.handler import Context, Handler
from loom.batching.serve import ModelServerComponent
from loom.bench.process import free_port, serve_in_thread
from loom.engine.config import EngineConfig
from loom.entrypoints.openai.serve import LLMComponent, LLMServerConfig
from loom.server.app import build_app
from loom.server.guard import HTTPPolicy

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the capital of France is Paris and a quick brown fox jumps over lazy dogs while rivers run to the sea".split()


# ---- the LLM server under disconnects and bursts ---------------------------------------------------------------
@dataclass(slots=True)
class LLMFaults:
    requests: int = 1000
    concurrency: int = 12
    """Clients of the main phase: fewer than the capacity, so most requests run (the burst is the overload)."""
    disconnect: float = 0.3
    """Share of requests whose client goes away mid-request (streaming: after a few events; else: a timeout)."""
    stream: float = 0.5
    burst_factor: int = 10
    """The burst sends this many times the server's capacity (running + waiting sequences) at once."""
    max_num_seqs: int = 8
    max_waiting: int = 8
    seed: int = 0

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_waiting


def llm_server(model_dir: Path, faults: LLMFaults, **config):
    """A tiny-model LLM server in this process (the engine is read directly for the leak check)."""
    engine = EngineConfig(model=str(model_dir), num_kv_blocks=256, max_num_seqs=faults.max_num_seqs, max_model_len=512)
    llm_config = LLMServerConfig(engine, served_model_names=["tiny"], max_waiting=faults.max_waiting, threads=1,
                                 **config)
    registry = CollectorRegistry()
    component = LLMComponent(llm_config, registry)
    return serve_in_thread(build_app([component], registry, HTTPPolicy(max_body_bytes=64 << 20))), component


class HealthWatch:
    """Polls /health every ``every`` seconds on its own connection: latencies and failures while it runs."""

    def __init__(self, url: str, every: float = 0.05):
        self.url, self.every = url, every
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = (await client.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - start)
                self.failures += not ok
                await asyncio.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> dict:
        ms = sorted(1000 * x for x in self.latencies) or [0.0]
        return {"polls": len(self.latencies), "failures": self.failures, "p50_ms": round(statistics.median(ms), 2),
                "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2)}


async def _request(client: httpx.AsyncClient, rng: random.Random, faults: LLMFaults, stream: bool | None = None,
                   disconnect: bool | None = None) -> str:
    """One completion; its outcome: the HTTP status, or "disconnected" when this client went away first."""
    stream = rng.random() < faults.stream if stream is None else stream
    disconnect = rng.random() < faults.disconnect if disconnect is None else disconnect
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
    body = {"model": "tiny", "prompt": words, "max_tokens": rng.randint(4, 48), "ignore_eos": True, "stream": stream,
            "temperature": 1.0, "seed": rng.randint(0, 1 << 30)}
    if stream:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return str(response.status_code)
            events, stop_after = 0, rng.randint(1, 4) if disconnect else None
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if stop_after is not None and events >= stop_after:
                    return "disconnected"  # leaving the block closes the connection mid-stream
        return "200"
    try:
        timeout = rng.uniform(0.005, 0.15) if disconnect else None
        response = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout)
    except TimeoutError:
        return "disconnected"
    return str(response.status_code)


async def llm_fault_run(url: str, faults: LLMFaults) -> dict:
    rng = random.Random(faults.seed)
    watch = HealthWatch(url)
    watcher = asyncio.create_task(watch.run())
    outcomes: Counter = Counter()
    todo = iter(range(faults.requests))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(seed: int) -> None:
            own = random.Random(seed)
            for _ in todo:
                outcomes[await _request(client, own, faults)] += 1

        await asyncio.gather(*(worker(rng.randint(0, 1 << 30)) for _ in range(faults.concurrency)))
        burst = faults.burst_factor * faults.capacity
        results = await asyncio.gather(*(_request(client, random.Random(i), faults, stream=False, disconnect=False)
                                         for i in range(burst)))
    burst_outcomes = Counter(results)
    idle = await _wait_idle(url)
    watch.stop()
    await watcher
    return {"requests": faults.requests, "outcomes": dict(outcomes), "burst": burst,
            "burst_outcomes": dict(burst_outcomes), "health": watch.summary(), "idle": idle,
            "seconds": round(time.perf_counter() - started, 2)}


async def _wait_idle(url: str, timeout: float = 60.0) -> dict:
    """The LLM part of /health once nothing is in flight (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while True:
            llm = (await client.get("/health")).json()["components"]["llm"]
            if llm["in_flight"] == 0 and llm["running"] == 0 and llm["waiting"] == 0 or time.monotonic() > deadline:
                return llm
            await asyncio.sleep(0.1)


def run_llm(model_dir: Path, faults: LLMFaults) -> dict:
    server, component = llm_server(model_dir, faults)
    try:
        result = asyncio.run(llm_fault_run(server.url, faults))
        engine = component.front.engine  # idle now: reading it from this thread is safe
        manager = engine.block_manager
        result["kv_blocks"] = manager.num_blocks
        result["kv_blocks_leaked"] = manager.num_blocks - manager.num_free_blocks
        result["engine_unfinished"] = int(engine.has_unfinished_requests())
    finally:
        server.stop()
    return result


# ---- /health while a huge prompt is tokenized ---------------------------------------------------------------------
async def _health_during(url: str, path: str, body_file: Path) -> dict:
    """Poll /health while another process (curl, as a real client would be) posts a huge body to ``path``."""
    watch = HealthWatch(url, every=0.01)
    watcher = asyncio.create_task(watch.run())
    await asyncio.sleep(0.2)
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
        "--data-binary", f"@{body_file}", f"{url}{path}", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    seconds = time.perf_counter() - start
    watch.stop()
    await watcher
    return {"status": int(out), "request_seconds": round(seconds, 2), "health": watch.summary()}


def _words(megabytes: float, rng: random.Random) -> str:
    words, size = [], 0
    while size < megabytes * 2**20:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)


def run_health(model_dir: Path, prompt_mb: float = 30.0, tokenize_mb: float = 2.0, seed: int = 0) -> dict:
    """/health while a ``prompt_mb`` completion prompt is refused (its prefix tokenized, the body parsed) and while
    a ``tokenize_mb`` text is tokenized whole by /tokenize (the character limit raised to allow both)."""
    rng = random.Random(seed)
    big, whole = _words(prompt_mb, rng), _words(tokenize_mb, rng)
    server, _ = llm_server(model_dir, LLMFaults(), max_prompt_chars=len(big) + len(whole))
    result = {"prompt_chars": len(big), "tokenize_chars": len(whole)}
    try:
        for name, path, body in (("completion", "/v1/completions", {"model": "tiny", "prompt": big, "max_tokens": 1}),
                                 ("tokenize", "/tokenize", {"prompt": whole})):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                f.write(json.dumps(body).encode())
                f.flush()
                result[name] = asyncio.run(_health_during(server.url, path, Path(f.name)))
    finally:
        server.stop()
    return result


# ---- a finetune killed with SIGKILL, then resumed -----------------------------------------------------------------
def _finetune_data(path: Path, num: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            f.write(json.dumps({"instruction": "Reverse the words.", "input": " ".join(words),
                                "output": " ".join(reversed(words))}) + "\n")
    return path


def _finetune_cmd(model_dir: Path, data: Path, output: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "loom.cli", "finetune", "--model", str(model_dir), "--data", str(data),
            "--output", str(output), "--max-steps", str(steps), "--save-every", "1", "--batch-size", "2",
            "--max-length", "64", "--lr", "1e-3", "--lora", "--lora-r", "4", "--lora-dropout", "0.1",
            "--threads", "1", "--no-progress", "--seed", "0"]


def _newest_step(checkpoints: Path) -> int:
    steps = [int(p.name[5:]) for p in checkpoints.glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _checkpoints_load(folder: Path) -> tuple[int, int]:
    """(complete checkpoints, ones that fail to load): a checkpoint is complete once its trainer.json exists."""
    import torch

    complete = [p for p in folder.glob("step-*") if (p / "trainer.json").is_file()]
    bad = 0
    for path in complete:
        try:
            torch.load(path / "state.pt", weights_only=True)
            _ = _weights_of(path)
        except Exception:  # noqa: BLE001 - any failure to load is a corrupt checkpoint
            bad += 1
    return len(complete), bad


def _weights_of(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "trainable.safetensors"))


def run_finetune(workdir: Path, model_dir: Path, steps: int = 30, seed: int = 0, timeout: float = 600) -> dict:
    rng = random.Random(seed)
    data = _finetune_data(workdir / "train.jsonl", seed=seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    whole, killed = workdir / "whole", workdir / "killed"
    subprocess.run(_finetune_cmd(model_dir, data, whole, steps), env=env, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at = rng.randint(3, steps - 3)
    proc = subprocess.Popen(_finetune_cmd(model_dir, data, killed, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = killed / "checkpoints"
    deadline = time.monotonic() + timeout
    # NOTE: wait for ANY checkpoint at or past kill_at: with one checkpoint kept, step-k lives for a single step, and a
    # poller starved on a busy machine missed it and saw the run end (a flaky failure under load)
    while (reached := _newest_step(checkpoints)) < kill_at:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the finetune ended before step {kill_at} (exit {proc.returncode})")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    kill_at = reached
    proc.wait(30)
    saved = sorted(p.name for p in checkpoints.glob("step-*") if (p / "trainer.json").is_file())
    complete, corrupt = _checkpoints_load(checkpoints)
    leftovers = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp"))
    subprocess.run(_finetune_cmd(model_dir, data, killed, steps) + ["--resume"], env=env, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = _weights(whole), _weights(killed)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return {"steps": steps, "killed_after_checkpoint": kill_at, "resumed_from": saved[-1] if saved else None,
            "checkpoints_after_kill": complete, "corrupt_checkpoints": corrupt, "tmp_leftovers": leftovers,
            "same_tensors": sorted(a) == sorted(b), "max_abs_diff": diff}


# ---- a model-server worker killed mid-batch ----------------------------------------------------------------------
class SlowEcho(Handler):
    """Echoes each item after sleeping ``sleep_s`` per batch (the fault run's stand-in for a model)."""

    def setup(self, ctx: Context) -> None:
        self.sleep_s = float(ctx.options.get("sleep_s", 1.0))

    def inference(self, batch: list) -> list:
        time.sleep(self.sleep_s)
        return [{"item": x, "pid": os.getpid()} for x in batch]


def run_worker(batch: int = 4, timeout_ms: float = 10_000) -> dict:
    config = ModelConfig("slow", f"{Path(__file__).resolve()}#SlowEcho", batch_size=batch, max_batch_delay=100,
                         request_timeout=timeout_ms, dispatch_when_idle=False, options={"sleep_s": 2.0})
    registry = CollectorRegistry()
    component = ModelServerComponent([config], registry, "token", management_port=free_port(), token_file=None)
    server = serve_in_thread(build_app([component], registry))
    try:
        model = component.server.get("slow")
        old_pid = model.slots[0].process.pid
        answers: list = [None] * batch

        def post(i: int) -> None:
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/predictions/slow", json=i, timeout=60)
            answers[i] = (r.status_code, time.perf_counter() - start)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(batch)]
        for t in threads:
            t.start()
        _until(lambda: model.in_flight_batches == 1, 30)
        killed_at = time.perf_counter()
        os.kill(old_pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        answered_after = time.perf_counter() - killed_at
        _until(lambda: model.slots and model.slots[0].process.pid != old_pid and model.slots[0].process.is_alive, 60)
        later = [httpx.post(f"{server.url}/predictions/slow", json=i, timeout=60).status_code for i in range(2)]
        return {"batch": batch, "statuses": [a[0] for a in answers], "answered_s_after_kill": round(answered_after, 3),
                "deadline_s": timeout_ms / 1000, "old_pid": old_pid, "new_pid": model.slots[0].process.pid,
                "later_statuses": later}
    finally:
        server.stop()


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


# ---- command line -----------------------------------------------------------------------------------------------
def tiny_model(folder: Path) -> Path:
    from loom.models.catalogue import resolve_model
    from loom.models.tiny import save_tiny_model

    return save_tiny_model(folder, resolve_model("smollm2"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=["llm", "health", "finetune", "worker", "all"])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-mb", type=float, default=30.0, help="the completion prompt refused as too long")
    parser.add_argument("--tokenize-mb", type=float, default=2.0, help="the text /tokenize tokenizes whole")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/faults.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="loom-faults-") as tmp:
        model = tiny_model(Path(tmp) / "tiny")
        if args.run in ("llm", "all"):
            results["llm"] = r = run_llm(model, LLMFaults(requests=args.requests, seed=args.seed))
            print(f"llm: {r['requests']} requests {r['outcomes']}, burst of {r['burst']} {r['burst_outcomes']}, "
                  f"/health {r['health']['failures']} failures (max {r['health']['max_ms']} ms), "
                  f"KV blocks leaked {r['kv_blocks_leaked']}, running at the end {r['idle']['running']}")
        if args.run in ("health", "all"):
            results["health"] = r = run_health(model, args.prompt_mb, args.tokenize_mb, args.seed)
            c, t = r["completion"], r["tokenize"]
            print(f"health: a {r['prompt_chars'] / 2**20:.0f} MB completion prompt answered {c['status']} in "
                  f"{c['request_seconds']} s, /health max {c['health']['max_ms']} ms; /tokenize of "
                  f"{r['tokenize_chars'] / 2**20:.0f} MB answered {t['status']} in {t['request_seconds']} s, /health "
                  f"p50 {t['health']['p50_ms']} ms, max {t['health']['max_ms']} ms over {t['health']['polls']} polls")
        if args.run in ("finetune", "all"):
            results["finetune"] = r = run_finetune(Path(tmp), model, seed=args.seed)
            print(f"finetune: killed after checkpoint {r['killed_after_checkpoint']} of {r['steps']}, resumed from "
                  f"{r['resumed_from']}, corrupt checkpoints {r['corrupt_checkpoints']}, max |diff| vs an "
                  f"uninterrupted run {r['max_abs_diff']:.3g}")
        if args.run in ("worker", "all"):
            results["worker"] = r = run_worker()
            print(f"worker: batch of {r['batch']} answered {r['statuses']} {r['answered_s_after_kill']} s after "
                  f"kill -9 (deadline {r['deadline_s']} s); replaced {r['old_pid']} -> {r['new_pid']}; later "
                  f"{r['later_statuses']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
