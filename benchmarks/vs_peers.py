"""Loom's model server against TorchServe, LitServe and Ray Serve on all-MiniLM-L6-v2, in two modes, in one run.

- **server** mode compares the servers: every one runs the identical model code (``PaddedMiniLM`` in
  benchmarks/_peer_servers.py: HF ``AutoModel`` on a padded batch, mean pooling, L2 normalisation; Loom through a
  handler file that wraps exactly that code). The ratio measures batching, queueing, HTTP and worker overhead only.
- **archive** mode is server mode through TorchServe's own packaging: the archive torch-model-archiver makes of
  the server-mode handler (a ``BaseHandler`` subclass) is served by TorchServe and, unchanged, by Loom's
  ``torchserve`` handler (``--serve minilm=minilm.mar``, TorchServe's ``ts`` package on its path). LitServe and Ray
  Serve take no archives, so this mode has TorchServe alone as the peer. The ratio is what moving a ``.mar`` to Loom
  buys, handler code untouched.
- **product** mode compares what a user gets out of the box: Loom's built-in ``embedding`` handler (packed,
  unpadded encoder with pre-packed oneDNN weights) against each peer running sentence-transformers' ``encode`` (the
  library the model is published for; no peer ships an embedding handler) in its handler API with its recommended
  settings (LitServe ``fast_queue=True``). The ratio adds the model path to the serving layer.

The summary also gives, per mode and peer, the ratio per CPU-second (requests per CPU-second of each server's whole
session: what a request costs, whatever share of a shared machine the server got) and its ceiling: the model code
alone in this process, on batches of the largest batch size with one worker's threads, against the peer. With the
same model code a serving layer that cost nothing would reach that ceiling and no more.

Load: seeded sentences of 6-14 words, one per request as {"text": ...}, closed loop at --concurrency keep-alive
connections (loom.bench.load_client, the same client for every server) for --duration seconds after a warm-up.
Every server runs each setting of --batch-sizes x --workers with the same --max-batch-delay and torch threads =
(cores - 1) / workers, --rounds times with the order of the servers rotated (the machine is shared; other jobs
come and go); per mode, a server's figure is its best setting's median over rounds. Lone requests (one client,
back to back) are timed on each idle server; Loom's responses carry the worker's handler time
(X-Loom-Inference-Ms), so its overhead beyond the model's own time is measured per request.

Peers run from a separate virtual environment (--peers-python, its bin folder; ``pip install torchserve
torch-model-archiver pyyaml litserve 'ray[serve]' sentence-transformers`` there after torch), Loom from this
interpreter. A peer that is not installed is skipped with a note. Targets (issue 18): server mode >= 1.5x
TorchServe and >= 1.2x LitServe, product mode >= 2x TorchServe and >= 1.5x LitServe, lone overhead <= 1 ms.

    nice -n 10 .venv/bin/python benchmarks/vs_peers.py --peers-python .venv-peers/bin --batch-sizes 8 --workers 1,2 \\
        --duration 8 --rounds 2
Prints one summary line and writes results/vs_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_servers import ARCHIVE_PEERS, COMMON, MODES, PEERS, missing, serve, write_common  # noqa: E402
from _serving import cpu_count, cpu_flags, measure, model_time_ms, workload  # noqa: E402
from isa import TORCH_AVX2_ENV  # noqa: E402

from loom.batching.handlers.embedding import default_model_dir  # noqa: E402

TARGETS = {("server", "torchserve"): 1.5, ("server", "litserve"): 1.2, ("product", "torchserve"): 2.0,
           ("product", "litserve"): 1.5}
LONE_TARGET_MS = 1.0
ROW_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "lone_p50_ms", "lone_overhead_p50_ms", "lone_model_p50_ms",
            "requests_per_cpu_s", "server_cpu_cores")


def worker_threads(workers: int) -> int:
    """torch threads per worker for EVERY server: Loom's default rule, (cores - 1) / workers, at least 1."""
    return max(1, (cpu_count() - 1) // workers)


def run_setting(mode: str, peers: list[str], batch: int, workers: int, args, payloads: list[bytes],
                workdir: Path) -> dict[str, dict]:
    """Every peer on one setting, --rounds times, the order rotated each round; a peer's figure is the median."""
    threads = worker_threads(workers)
    rounds: dict[str, list[dict]] = {peer: [] for peer in peers}
    for r in range(args.rounds):
        for peer in peers[r % len(peers):] + peers[:r % len(peers)]:
            row = _measure_one(mode, peer, batch, workers, threads, args, payloads, workdir)
            if row is not None:
                row.update(round=r)
                rounds[peer].append(row)
    return {peer: _median_row(rows) for peer, rows in rounds.items() if rows}


def _measure_one(mode, peer, batch, workers, threads, args, payloads, workdir) -> dict | None:
    """One server on one setting; a failure is retried once (on a shared machine another process can take a port
    between free_port() and the server's bind), then reported and skipped."""
    for attempt in (1, 2):
        t0 = time.monotonic()
        try:
            with serve(peer, mode, batch, workers, args.max_batch_delay, threads, workdir, args.peers_python) as served:
                started_s = time.monotonic() - t0
                row = measure(served[0], payloads, args.concurrency, args.duration, args.warmup, args.lone_requests,
                              served[1])
            break
        except Exception as exc:  # noqa: BLE001 - one peer failing must not lose the others' figures
            print(f"  {mode} {peer}: failed (attempt {attempt} of 2), {exc}", flush=True)
    else:
        return None
    row.update(mode=mode, peer=peer, batch_size=batch, workers=workers, threads=threads,
               startup_s=round(started_s, 1), load_average=round(os.getloadavg()[0], 2))
    extra = f" (overhead {row['lone_overhead_p50_ms']:.2f} ms)" if row["lone_overhead_p50_ms"] is not None else ""
    print(f"  {mode:7s} {peer:10s} batch {batch:>3} x {workers} workers: {row['requests_per_s']:8.1f} req/s  "
          f"({row['requests_per_cpu_s']} req per CPU-s, {row['server_cpu_cores']} cores)  p50 {row['p50_ms']:7.1f} ms  "
          f"p99 {row['p99_ms']:7.1f} ms  lone p50 {row['lone_p50_ms']:.2f} ms{extra}  errors {row['errors']}  "
          f"load {row['load_average']}", flush=True)
    return row


def _median_row(rows: list[dict]) -> dict:
    merged = {k: (statistics.median([r[k] for r in rows]) if rows[0][k] is not None else None) for k in ROW_KEYS}
    merged.update({k: rows[0][k] for k in ("mode", "peer", "batch_size", "workers", "threads")})
    merged["errors"] = sum(r["errors"] for r in rows)
    merged["rounds"] = rows
    return merged


def available_peers(names: list[str], peers_bin: Path, skipped: dict[str, str]) -> list[str]:
    peers = []
    for peer in names:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
        why = missing(peer, peers_bin)
        if why:
            skipped[peer] = f"not installed: {why} (see --peers-python)"
            print(f"  {peer}: skipped, {skipped[peer]}", flush=True)
        else:
            peers.append(peer)
    return peers


def run_all(args, peers: list[str], payloads: list[bytes], skipped: dict[str, str]) -> dict[str, dict[str, list]]:
    """results[mode][peer] = one merged row per setting."""
    results = {mode: {peer: [] for peer in _mode_peers(mode, peers)} for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="loom-vs-peers-") as tmp:
        write_common(Path(tmp))
        for mode in args.modes:
            for workers in args.workers:
                for batch in args.batch_sizes:
                    mode_peers = _mode_peers(mode, peers)
                    if len(mode_peers) < 2:
                        continue
                    for peer, row in run_setting(mode, mode_peers, batch, workers, args, payloads,
                                                 Path(tmp)).items():
                        results[mode][peer].append(row)
    for mode, by_peer in results.items():
        for peer, rows in by_peer.items():
            if not rows:
                skipped[f"{mode} {peer}"] = "failed in every setting (see the log lines above)"
    return results


def _mode_peers(mode: str, peers: list[str]) -> list[str]:
    """The servers a mode compares: archive mode only Loom and TorchServe (and only when TorchServe is installed:
    Loom's side needs its ts package and archiver)."""
    if mode != "archive":
        return peers
    return [p for p in peers if p in ARCHIVE_PEERS] if "torchserve" in peers else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--modes", default=",".join(MODES),
                        help="server (same model code), product, archive (TorchServe's .mar on both)")
    parser.add_argument("--peers-python", type=Path, default=Path(sys.executable).parent,
                        help="bin folder of the virtual environment holding the peers (default: this one's)")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--max-batch-delay", type=float, default=5.0, help="ms, the same for every server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--lone-requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every setting, peers in rotated order")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: limit every server's kernels to AVX2 (emulates an AVX2-only CPU's ISA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/vs_peers.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the servers' clean-ups on the way out
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}, got {args.modes}")
    args.peers_python = args.peers_python.absolute()
    if args.isa == "avx2":
        os.environ.update(TORCH_AVX2_ENV)  # before torch is imported here; every server inherits it
    texts, payloads = workload(args.seed)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    # The in-process timings get a one-worker tokenizer pool, as in Loom's worker (HF tokenizers' Rayon pool is
    # sized once, at first use); the servers started later do not inherit the setting.
    os.environ["RAYON_NUM_THREADS"] = str(worker_threads(1))
    own = model_time_ms(texts, threads=worker_threads(min(args.workers)), batch_size=1)
    print(f"  model alone (Loom's embedding handler in-process, 1 sentence, {own['threads']} threads): "
          f"p50 {own['p50_ms']:.2f} ms", flush=True)
    ceilings = model_ceilings(texts, args)
    del os.environ["RAYON_NUM_THREADS"]
    skipped: dict[str, str] = {}
    peers = available_peers(args.peers.split(","), args.peers_python, skipped)
    results = run_all(args, peers, payloads, skipped)
    summary = summarise(results, own, ceilings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpu_count": cpu_count(), "cpu_flags": cpu_flags(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "command": " ".join(sys.argv),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model_alone": own, "model_ceilings": ceilings, "results": results, "skipped": skipped,
              "summary": summary}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(summary_line(summary, skipped) + f"; wrote {out}")
    return 0


def model_ceilings(texts: list[str], args) -> dict[str, dict]:
    """Per mode, the model code Loom runs, alone in this process on batches of the largest --batch-sizes with one
    worker's threads: sentences per CPU-second no server can beat with that code (a serving layer only adds)."""
    common: dict = {}
    exec(compile(COMMON, "minilm_common.py", "exec"), common)  # the exact server-mode code the servers import
    batch, threads = max(args.batch_sizes), worker_threads(1)
    padded = common["PaddedMiniLM"](str(default_model_dir()), threads)
    ceilings = {"server": model_time_ms(texts, threads, batch, repeats=40, embed=padded.embed),
                "product": model_time_ms(texts, threads, batch, repeats=40)}
    ceilings["archive"] = ceilings["server"]  # the same model code, packed in TorchServe's archive
    for mode, row in ceilings.items():
        print(f"  {mode} mode model alone, batch {batch}, {threads} thread(s): {row['items_per_cpu_s']:.1f} "
              f"sentences per CPU-second", flush=True)
    return ceilings


def summarise(results: dict[str, dict[str, list]], own: dict, ceilings: dict[str, dict]) -> dict:
    """Per mode: each server's best setting, Loom's ratio to each peer (req/s and per CPU-second), the ceiling of
    the per-CPU ratio (the model alone against the peer: what a serving layer that cost nothing would reach), Loom's
    lone overhead (median over every Loom row and round of the mode), and whether each target was met."""
    summary: dict = {"model_alone_p50_ms": own["p50_ms"]}
    for mode, by_peer in results.items():
        best = {peer: max(rows, key=lambda r: r["requests_per_s"]) for peer, rows in by_peer.items() if rows}
        part: dict = {peer: {k: row[k] for k in ("requests_per_s", "requests_per_cpu_s", "server_cpu_cores",
                                                  "batch_size", "workers", "p50_ms", "p99_ms", "lone_p50_ms")}
                      for peer, row in best.items()}
        if "loom" in best:
            lone = [r["lone_overhead_p50_ms"] for row in by_peer["loom"] for r in row["rounds"]
                    if r["lone_overhead_p50_ms"] is not None]
            part["loom_lone_overhead_ms"] = round(statistics.median(lone), 3) if lone else None
            for peer in (p for p in best if p != "loom"):
                part[f"loom_vs_{peer}"] = _ratio(best["loom"], best[peer], "requests_per_s")
                part[f"loom_vs_{peer}_per_cpu"] = _ratio(best["loom"], best[peer], "requests_per_cpu_s")
                if best[peer]["requests_per_cpu_s"]:
                    part[f"ceiling_vs_{peer}_per_cpu"] = round(
                        ceilings[mode]["items_per_cpu_s"] / best[peer]["requests_per_cpu_s"], 3)
                if (mode, peer) in TARGETS and part[f"loom_vs_{peer}"] is not None:
                    part[f"target_{peer}"] = {"want": TARGETS[mode, peer],
                                              "met": part[f"loom_vs_{peer}"] >= TARGETS[mode, peer]}
        summary[mode] = part
    lone = [summary[m].get("loom_lone_overhead_ms") for m in results if summary[m].get("loom_lone_overhead_ms")]
    summary["loom_lone_overhead_ms"] = max(lone) if lone else None
    summary["lone_target_met"] = bool(lone) and max(lone) <= LONE_TARGET_MS
    return summary


def _ratio(loom: dict, peer: dict, key: str) -> float | None:
    return round(loom[key] / peer[key], 3) if loom[key] and peer[key] else None


def _ratio_text(part: dict, peer: str) -> str:
    """"loom/litserve 1.30x (per CPU-s 1.20x, ceiling 1.26x)": req/s ratio, per-CPU ratio, model-only ceiling."""
    extra = [f"{name} {part[key]:.2f}x" for name, key in (("per CPU-s", f"loom_vs_{peer}_per_cpu"),
                                                         ("ceiling", f"ceiling_vs_{peer}_per_cpu"))
             if part.get(key) is not None]
    return f"loom/{peer} {part[f'loom_vs_{peer}']:.2f}x" + (f" ({', '.join(extra)})" if extra else "")


def summary_line(summary: dict, skipped: dict) -> str:
    parts = []
    for mode in MODES:
        part = summary.get(mode)
        if not part:
            continue
        servers = [f"{p} {s['requests_per_s']:.1f}" for p, s in part.items()
                   if isinstance(s, dict) and "batch_size" in s]
        ratios = [_ratio_text(part, k[8:]) for k, v in part.items()
                  if k.startswith("loom_vs_") and not k.endswith("_per_cpu") and v is not None]
        lone = part.get("loom_lone_overhead_ms")
        lone_text = [f"loom lone overhead {lone:.2f} ms"] if lone is not None else []
        parts.append(f"{mode} mode: {', '.join(servers)} req/s; " + ", ".join(ratios + lone_text))
    skipped_text = "".join(f"; {p} skipped" for p in skipped)
    return "vs_peers: " + " | ".join(parts) + skipped_text


if __name__ == "__main__":
    sys.exit(main())
