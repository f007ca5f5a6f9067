"""Decode steps with one C++ call per layer against the op-by-op layers, in the same process, alternated request by
request: SmolLM2-135M as the packaged Q4_1 GGUF, as the float32 folder, and as that folder with --quantization int8.

    python benchmarks/layer_calls.py --pairs 12

Per weights: one engine; a 32-token prompt generates 64 tokens (greedy, ignore_eos) with the whole-layer calls
(``CpuOps.decode_layers``) on, then off (the engine's layer plan emptied, so every layer runs op by op), the order
swapped every pair. Step = the request's wall time / its engine steps; the figure is the median over pairs of on/off.
Prints one summary line and writes JSON (default results/layer_calls.json).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, names_arg, write_json  # noqa: E402
from benchmarks.quantized import packaged_gguf  # noqa: E402

WEIGHTS = {"q4_1": (None, None), "float32": ("smollm2:f32", None), "int8": ("smollm2:f32", "int8")}


def measure(model: str, quantization: str | None, pairs: int, seed: int) -> dict:
    from loom import LLM, SamplingParams

    llm = LLM(model, seed=seed, quantization=quantization)
    ops, engine = llm.engine.model.ops, llm.engine
    rng = random.Random(seed)
    prompt = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(32)]}]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=4))  # warm-up: kernels built, the layer plan made
    plan = ops._decode_plan
    if not plan:
        raise SystemExit(f"{model}: its layers have no whole-layer call here (no C++ kernels, or a layer kind they "
                         "do not compute)")
    steps: dict[str, list[float]] = {"layer_calls": [], "op_by_op": []}
    for k in range(pairs):
        for name in ("layer_calls", "op_by_op") if k % 2 == 0 else ("op_by_op", "layer_calls"):
            ops._decode_plan = plan if name == "layer_calls" else ()
            before = engine.stats().num_steps
            start = time.perf_counter()
            llm.generate(prompt, params)
            steps[name].append(1e3 * (time.perf_counter() - start) / (engine.stats().num_steps - before))
    ratios = [a / b for a, b in zip(steps["layer_calls"], steps["op_by_op"])]
    return {"step_ms": {name: statistics.median(v) for name, v in steps.items()}, "steps_ms": steps,
            "ratio_median_of_pairs": statistics.median(ratios)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=names_arg(WEIGHTS), default=list(WEIGHTS),
                    help=f"comma-separated, among {', '.join(WEIGHTS)}")
    ap.add_argument("--out", default="results/layer_calls.json")
    args = ap.parse_args()
    results = {}
    for name in args.weights:
        model, quantization = WEIGHTS[name]
        results[name] = measure(model or packaged_gguf(), quantization, args.pairs, args.seed)
    write_json(args.out, {"results": results, "machine": machine(), "command": sys.argv})
    print("decode step, one call per layer / op by op: " + ", ".join(
        f"{name} {r['step_ms']['layer_calls']:.2f} / {r['step_ms']['op_by_op']:.2f} ms "
        f"({r['ratio_median_of_pairs']:.3f}x over {args.pairs} pairs)" for name, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
