"""Serving overhead: requests/s through `loom serve` at batch 32 against the same model's batched throughput
in-process (the handler called directly on batches of 32 with the worker's torch thread count), in one run.

Loom keeps the server's share small: one asyncio process parses HTTP and forms batches, one worker process runs
the model; the ratio says how much of the model's own throughput survives HTTP, JSON, queueing and the pipe to
the worker. The in-process figure is measured before and after the server run and averaged, because other jobs
on a shared machine move both. Target: >= 0.90.

The in-process model gets the threads the server's worker gets (Loom's rule: cores - 1, here 1), so the ratio
is the serving stack's cost, not a difference in resources; the in-process figure with every core is printed too
(on 2 cores it is not a fair ceiling: the server's HTTP process and the load client need CPU the model then lacks).

    nice -n 10 python benchmarks/serving_overhead.py --duration 15
Prints one summary line and writes results/serving_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_servers import serve  # noqa: E402
from _serving import cpu_count, measure, model_time_ms, workload  # noqa: E402
from vs_peers import worker_threads  # noqa: E402


def in_process(texts: list[str], threads: int, args) -> dict:
    """The model's own batched throughput in this process with ``threads`` torch threads."""
    return model_time_ms(texts, threads, batch_size=args.batch_size, repeats=args.batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64, help="clients; 2x the batch keeps the worker fed")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--batches", type=int, default=40, help="in-process batches per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/serving_overhead.json")
    args = parser.parse_args()
    threads = worker_threads(1)
    texts, payloads = workload(args.seed)

    before = in_process(texts, threads, args)
    all_cores = in_process(texts, cpu_count(), args)
    with tempfile.TemporaryDirectory(prefix="loom-overhead-") as tmp:
        with serve("loom", "product", args.batch_size, 1, args.max_batch_delay, threads, Path(tmp),
                   Path(sys.executable).parent) as (url, session):
            served = measure(url, payloads, args.concurrency, args.duration, args.warmup, lone_requests=0,
                             session=session)
    after = in_process(texts, threads, args)
    model = (before["items_per_s"] + after["items_per_s"]) / 2
    ratio = served["requests_per_s"] / model
    # The same comparison in CPU terms, which a shared machine's changing share does not move: requests per
    # CPU-second of the server's whole session (server + worker) vs sentences per CPU-second in-process.
    in_process_cpu = (before["items_per_cpu_s"] + after["items_per_cpu_s"]) / 2
    ratio_cpu = served["requests_per_cpu_s"] / in_process_cpu if served["requests_per_cpu_s"] else None
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": cpu_count(),
              "worker_threads": threads, "args": vars(args), "in_process_before": before, "in_process_after": after,
              "in_process_all_cores": all_cores,
              "served": served, "ratio": round(ratio, 3), "ratio_per_cpu_s": round(ratio_cpu, 3) if ratio_cpu else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"serving_overhead: batch {args.batch_size}, {args.concurrency} clients: served "
          f"{served['requests_per_s']:.1f} req/s vs in-process {model:.1f} sentences/s with {threads} thread(s) "
          f"({before['items_per_s']:.1f} before, {after['items_per_s']:.1f} after) = {ratio:.1%} (target >= 90%); "
          f"per CPU-second {served['requests_per_cpu_s']} "
          f"vs {in_process_cpu:.1f} = {ratio_cpu:.1%}; in-process with all {cpu_count()} cores: "
          f"{all_cores['items_per_s']:.1f} sentences/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
