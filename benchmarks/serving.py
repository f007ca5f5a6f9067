"""Online serving benchmark (vLLM benchmark_serving style) for any OpenAI-compatible server; the same code as
`loom bench serving`. Seeded random prompts over HTTP streaming; TTFT / TPOT / ITL (mean, p50, p99), request
throughput, output tokens/s; JSON + PNG under results/.

    # Loom vs `transformers serve --continuous-batching`, one after the other, same model and workload:
    nice -n 10 .venv/bin/python benchmarks/serving.py --compare-transformers --num-prompts 64 --concurrencies 16
    # any running server:
    .venv/bin/python benchmarks/serving.py --base-url http://127.0.0.1:8000/v1 --model smollm2 --concurrencies 1,4,16
"""

from __future__ import annotations

import sys

from loom.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
