"""Tensor parallelism on CPU: the offline throughput workload (benchmarks/throughput.py) through tensor_parallel_size
1 and N on the same cores, alternated round by round.

    python benchmarks/tensor_parallel.py --tp 2 --num-prompts 32 --rounds 2

TP=1 runs one process with every core's thread; TP=N runs N processes (rank 0 schedules and samples) with
cores / N threads each, so both use the same cores. Prints one summary line (median tokens/s of each and the ratio)
and writes JSON (default results/tensor_parallel.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.throughput import make_workload  # noqa: E402


def run(model_path: str, tp: int, w, seed: int) -> dict:
    from loom import LLM, SamplingParams

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # TP=1: every core; TP>1: the engine sets cores / N per rank itself
    with LLM(model=model_path, tensor_parallel_size=tp, seed=seed) as llm:
        llm.generate([{"prompt_token_ids": p[:32]} for p in w.prompts[:4]], SamplingParams(max_tokens=4))
        params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        steps = llm.engine.stats().num_steps
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == w.num_output_tokens
    tokens = w.num_prompt_tokens + w.num_output_tokens
    return {"tp": tp, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
            "output_tokens_per_s": produced / elapsed, "num_steps": steps, "threads_per_rank": cores // tp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2:f32", help="float32 weights: TP=1 and TP=2 load the same ones")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/tensor_parallel.json")
    args = ap.parse_args()

    from transformers import AutoConfig

    from loom.models.catalogue import resolve_model

    model_path = str(resolve_model(args.model))
    w = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len),
                      AutoConfig.from_pretrained(model_path).vocab_size, args.seed)
    rounds = []
    for i in range(args.rounds):
        order = (1, args.tp) if i % 2 == 0 else (args.tp, 1)
        rounds.append({f"tp{tp}": run(model_path, tp, w, args.seed) for tp in order})
    one = statistics.median(r["tp1"]["tokens_per_s"] for r in rounds)
    many = statistics.median(r[f"tp{args.tp}"]["tokens_per_s"] for r in rounds)
    summary = {"tp1_tokens_per_s": one, f"tp{args.tp}_tokens_per_s": many, "ratio": many / one}
    write_json(args.out, {"summary": summary, "rounds": rounds, "machine": machine(), "model": args.model,
                          "workload": {"num_prompts": args.num_prompts, "prompt_tokens": w.num_prompt_tokens,
                                       "output_tokens": w.num_output_tokens, "seed": args.seed}})
    print(f"tensor_parallel model={args.model} prompts={args.num_prompts} rounds={args.rounds} "
          f"tp1={one:.1f} tok/s tp{args.tp}={many:.1f} tok/s ratio={many / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
