"""One sampling step on CPU: the C++ kernel (``sample_rows``, what ``loom.ops.sampler.sample`` runs on CPU) against the
tensor ops it replaced (``sample_torch``: argmax, softmax, sort for top-k / top-p, cumsum, searchsorted), in the same
process, alternated.

    python benchmarks/sampler.py                       # rows 1,16,64,128; vocabulary 49,152 (SmolLM2's)
    python benchmarks/sampler.py --rows 1,32 --vocab 151936
    python benchmarks/sampler.py --engine --rows 1      # also: one request through the engine, kernel on / off

Logits are seeded normal draws times a scale: 1 (flat, most of the vocabulary inside top_p 0.9) and 4 (peaked, a few
hundred tokens inside it). Settings: greedy, temperature 1, top_p 0.9, top_k 50, and top_k 50 + top_p 0.9 + min_p
0.05. Each figure is the median of ``--repeats`` timed calls after a warm-up; the kernel's tokens are checked against
the tensor ops' on every case (they may differ only where a uniform falls within float rounding of a CDF step).
With ``--engine``: the packaged SmolLM2 (the default model) generates --engine-tokens tokens for one request at a
time, greedy, temperature 0.8, + top_p 0.95, + top_k 40, + repetition_penalty 1.1, with the C++ kernels and with the
tensor ops (``sample`` and the penalties made to take them), alternated, --engine-pairs times; the figure is ms per
output token (wall time / tokens), the median.
Prints one summary line and writes JSON (default results/sampler.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom.ops import sampler  # noqa: E402
from loom.ops.cpp_extension import extension_if_built  # noqa: E402
from loom.ops.sampler import SamplingRow, SamplingSettings  # noqa: E402

SETTINGS = {
    "greedy": SamplingSettings(temperature=0.0),
    "temperature": SamplingSettings(temperature=1.0),
    "top_p": SamplingSettings(temperature=1.0, top_p=0.9),
    "top_k": SamplingSettings(temperature=1.0, top_k=50),
    "all": SamplingSettings(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
}
SCALES = {"flat": 1.0, "peaked": 4.0}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


ENGINE_SETTINGS = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
                   "top_p": dict(temperature=0.8, top_p=0.95), "top_k": dict(temperature=0.8, top_k=40),
                   "repetition": dict(temperature=0.8, repetition_penalty=1.1)}


def engine_per_token(tokens: int, pairs: int) -> dict:
    """ms per output token of one request, per setting, with the kernel and with the tensor ops."""
    from loom import LLM, SamplingParams

    llm = LLM(seed=0)
    prompt = "Write a long story about a lighthouse keeper who finds a strange map."
    kernel_choice = sampler._cpu_extension  # "torch": sample and the penalties through the tensor ops
    results = {}
    for name, settings in ENGINE_SETTINGS.items():
        times = {"kernel": [], "torch": []}
        llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, **settings))
        for i in range(pairs):
            for path in ("kernel", "torch") if i % 2 == 0 else ("torch", "kernel"):
                sampler._cpu_extension = kernel_choice if path == "kernel" else (lambda logits: None)
                t = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_tokens=tokens, ignore_eos=True, seed=i, **settings))
                times[path].append((time.perf_counter() - t) / tokens * 1e3)
        sampler._cpu_extension = kernel_choice
        results[name] = {path: round(statistics.median(ts), 2) for path, ts in times.items()}
        print(f"  engine, 1 request, {name:12s} tensor ops {results[name]['torch']:6.2f} ms/token  "
              f"kernel {results[name]['kernel']:6.2f} ms/token", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,128", help="comma-separated batch sizes")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--engine", action="store_true", help="also time one request through the engine")
    ap.add_argument("--engine-tokens", type=int, default=96)
    ap.add_argument("--engine-pairs", type=int, default=4)
    ap.add_argument("--out", default="results/sampler.json")
    args = ap.parse_args()
    ext = extension_if_built()
    if ext is None:
        print("the C++ extension did not build: nothing to compare", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n in (int(r) for r in args.rows.split(",")):
        for scale_name, scale in SCALES.items():
            logits = torch.randn(n, args.vocab, generator=gen) * scale
            for name, settings in SETTINGS.items():
                rows = [SamplingRow(settings, [1], [2] * 3, seed, frozenset()) for seed in range(n)]
                def run_kernel(logits=logits, rows=rows):
                    return ext.sample_rows(logits, *sampler._row_settings(rows))

                def run_torch(logits=logits, rows=rows):
                    return sampler.sample_torch(logits, rows)

                differ = int((run_kernel() != run_torch()).sum())
                t_torch, t_kernel = float("inf"), float("inf")
                for _ in range(2):  # alternated: the torch path, then the kernel, twice; the better of each
                    t_torch = min(t_torch, timed(run_torch, args.repeats))
                    t_kernel = min(t_kernel, timed(run_kernel, args.repeats))
                cases.append(dict(rows=n, logits=scale_name, settings=name, torch_ms=round(t_torch, 3),
                                  kernel_ms=round(t_kernel, 3), speedup=round(t_torch / t_kernel, 1),
                                  tokens_differ=differ))
                print(f"  rows {n:4d} {scale_name:6s} {name:12s} torch {t_torch:8.2f} ms  kernel {t_kernel:7.3f} ms  "
                      f"{t_torch / t_kernel:6.1f}x  (tokens differ: {differ})", flush=True)
    speedups = [c["speedup"] for c in cases]
    engine = engine_per_token(args.engine_tokens, args.engine_pairs) if args.engine else None
    result = dict(benchmark="sampler", vocab=args.vocab, machine=machine(), cases=cases, engine=engine,
                  median_speedup=statistics.median(speedups), min_speedup=min(speedups))
    write_json(args.out, result)
    line = (f"sampler: vocab {args.vocab}, {len(cases)} cases, kernel {statistics.median(speedups):.1f}x faster "
            f"(median; min {min(speedups):.1f}x); tokens differing {sum(c['tokens_differ'] for c in cases)}")
    if engine:
        line += "; 1 request ms/token tensor ops -> kernel: " + ", ".join(
            f"{name} {r['torch']:.2f} -> {r['kernel']:.2f}" for name, r in engine.items())
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
