"""`loom serve --replicas 2` vs `--replicas 1` (Ray Serve) and plain `loom serve`, on the model server's MiniLM load.

    python benchmarks/ray_replicas.py --rounds 3 --duration 8

Three servers run at once, each the same app (`--serve minilm=embedding`, batches of up to 8, one worker with one
torch thread per replica): plain `loom serve` (no Ray), and Ray Serve with 1 and with 2 replicas behind Ray's HTTP
proxy. Each round loads each server in turn (closed loop, `--concurrency` connections, Loom's load client, the same
512 seeded sentences as `loom bench load`), in an order that rotates every round; the figures are medians over
rounds. Prints one summary line and writes JSON (default results/ray_replicas.json).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom.bench.load_client import json_payloads, run_load, sentences  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402

VARIANTS = {"plain": [], "ray_1": ["--replicas", "1"], "ray_2": ["--replicas", "2"]}


def serve(extra: list[str], token_file: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--serve", "minilm=embedding", "--batch-size", "8",
           "--workers", "1", "--threads-per-worker", "1", "--management-port", str(free_port()),
           "--management-token-file", str(token_file),
           "--port", str(port), "--log-level", "warning", *extra]
    return start_server(cmd, f"http://127.0.0.1:{port}", ready_path="/ping", timeout=300)


def measure(url: str, payloads: list[bytes], args: argparse.Namespace) -> dict:
    target = f"{url}/predictions/minilm"
    asyncio.run(run_load(target, payloads, args.concurrency, duration_s=args.warmup))
    return asyncio.run(run_load(target, payloads, args.concurrency, duration_s=args.duration)).to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per server and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/ray_replicas.json")
    args = parser.parse_args()
    payloads = json_payloads(sentences(512, seed=args.seed))
    rounds: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        servers = {name: stack.enter_context(serve(extra, Path(tmp) / f"{name}.token"))
                   for name, extra in VARIANTS.items()}
        names = list(VARIANTS)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            rounds.append({name: measure(servers[name].url, payloads, args) for name in order})
            print(f"round {r + 1}: " + "  ".join(f"{n} {rounds[-1][n]['requests_per_s']:.1f} req/s "
                                                 f"p99 {rounds[-1][n]['p99_ms']:.0f} ms" for n in names), flush=True)
    summary = {name: {key: statistics.median(rd[name][key] for rd in rounds)
                      for key in ("requests_per_s", "p50_ms", "p99_ms")} for name in names}
    errors = {name: sum(rd[name]["errors"] for rd in rounds) for name in names}
    result = {"benchmark": "ray_replicas", "args": vars(args), "machine": machine(), "summary": summary,
              "errors": errors, "rounds": rounds}
    write_json(args.out, result)
    s = summary
    print(f"ray_replicas: plain {s['plain']['requests_per_s']:.1f} req/s p99 {s['plain']['p99_ms']:.0f} ms | "
          f"ray x1 {s['ray_1']['requests_per_s']:.1f} req/s p99 {s['ray_1']['p99_ms']:.0f} ms | "
          f"ray x2 {s['ray_2']['requests_per_s']:.1f} req/s p99 {s['ray_2']['p99_ms']:.0f} ms | "
          f"x2/x1 {s['ray_2']['requests_per_s'] / s['ray_1']['requests_per_s']:.2f} | errors {errors}")


if __name__ == "__main__":
    main()
