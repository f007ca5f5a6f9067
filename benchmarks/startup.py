"""Seconds from launching ``loom serve --model MODEL`` to its first 200 on /health (imports, reading the model's
config and weights, the KV pool, the server), each run a fresh process on a free loopback port, stopped after.

    python benchmarks/startup.py                          # the default model (the packaged Q4_1 GGUF), 3 runs
    python benchmarks/startup.py --model smollm2:f32 --runs 5
    PYTHONPATH=/path/to/older/tree python benchmarks/startup.py --out before.json    # the same, older code

Prints one summary line and writes JSON (default results/startup.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an older tree's loom comes first
from benchmarks.common import machine, write_json  # noqa: E402
from loom.bench.process import free_port, start_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="results/startup.json")
    args = ap.parse_args()

    import loom

    seconds = []
    for _ in range(args.runs):
        port = free_port()
        start = time.perf_counter()
        server = start_server([sys.executable, "-m", "loom.cli", "serve", "--model", args.model, "--port", str(port)],
                              f"http://127.0.0.1:{port}", env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                              cwd=Path(loom.__file__).parent.parent)  # `-m` puts the cwd first: this loom's tree
        seconds.append(round(time.perf_counter() - start, 2))
        server.stop()
        print(f"  ready after {seconds[-1]:.2f} s", flush=True)
    write_json(args.out, dict(benchmark="startup", loom=str(Path(loom.__file__).parent), model=args.model,
                              seconds=seconds, machine=machine()))
    print(f"startup: loom serve --model {args.model} answers /health after {statistics.median(seconds):.2f} s "
          f"(median of {args.runs}: {', '.join(f'{s:.2f}' for s in seconds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
