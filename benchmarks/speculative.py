"""N-gram speculative decoding vs plain decoding: one user at a time (concurrency 1) asking SmolLM2 to repeat or
edit code, greedy, in the same run.

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python benchmarks/speculative.py --num-prompts 8 --max-tokens 256 --k 4

Workload (seeded): ``--num-prompts`` chat requests, each a function from Python's standard library (source read with
``inspect``, so the same on every machine with Python 3.11) under one of three instructions (repeat it; rename the
function and repeat it; add a docstring and repeat it), up to ``--max-tokens`` output tokens, greedy, ending at EOS.
Each prompt runs once on a plain engine and once on a speculative one (``--k`` draft tokens, lookup n-grams of
``--lookup-min``..``--lookup-max``), alternating which goes first, one request at a time (``--concurrency N``: N
at once); the outputs must be identical. Figures: output tokens per second over all requests (tokens / summed
wall time), the speedup, the draft acceptance rate and the mean tokens per verification (accepted drafts + 1).
Several ``--k`` values (``--k 2,4,8``) run in turn against the same plain engine. Prints ONE summary line and
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import calendar
import colorsys
import difflib
import fnmatch
import glob
import inspect
import os
import random
import shlex
import statistics
import string
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402
from loom import LLM, SamplingParams  # noqa: E402

FUNCTIONS = (textwrap.dedent, textwrap.indent, shlex.quote, string.capwords, difflib.get_close_matches,
             colorsys.rgb_to_hls, statistics.median, random.Random.shuffle, glob.escape, statistics.mode,
             fnmatch.filter, calendar.monthrange)
"""Pure-Python functions of 8 to 49 lines (C builtins and frozen modules have no source to read)."""
INSTRUCTIONS = ("Repeat this code exactly:\n\n{code}",
                "Rename the function {name} to {name}_v2 and repeat the code:\n\n{code}",
                "Add a one-line docstring to this function and repeat the rest unchanged:\n\n{code}")


def workload(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        fn, template = rng.choice(FUNCTIONS), rng.choice(INSTRUCTIONS)
        code = textwrap.dedent(inspect.getsource(fn))
        chats.append([{"role": "user", "content": template.format(code=code, name=fn.__name__)}])
    return chats


def timed(llm: LLM, chats: list[list[dict]], params: SamplingParams) -> tuple[list[list[int]], float]:
    """Run ``chats`` together (one batch), outputs in order, and the wall time."""
    t = time.perf_counter()
    outs = llm.chat(chats, params)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    engine = dict(model=args.model, kv_cache_memory_gb=0.5, seed=args.seed)
    plain = LLM(**engine)
    specs = {k: LLM(**engine, speculative_config={"method": "ngram", "num_speculative_tokens": k,
                                                  "prompt_lookup_max": args.lookup_max,
                                                  "prompt_lookup_min": args.lookup_min}) for k in args.k}
    chats = workload(args.num_prompts, args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for llm in (plain, *specs.values()):  # warm-up: kernels, allocator, tokenizer
        llm.chat(chats[:1], SamplingParams(temperature=0, max_tokens=16))
    results = {}
    for k, spec in specs.items():
        before = spec.engine.stats()
        times = {"plain": 0.0, "spec": 0.0}
        tokens = 0
        for i in range(0, len(chats), args.concurrency):
            group = chats[i : i + args.concurrency]
            order = (("plain", plain), ("spec", spec)) if i % 2 == 0 else (("spec", spec), ("plain", plain))
            outs = {}
            for name, llm in order:
                outs[name], seconds = timed(llm, group, params)
                times[name] += seconds
            assert outs["spec"] == outs["plain"], f"prompts {i}..: speculative output differs from plain"
            tokens += sum(len(o) for o in outs["plain"])
        s = spec.engine.stats()
        drafts = s.num_spec_drafts - before.num_spec_drafts
        proposed = s.num_spec_draft_tokens - before.num_spec_draft_tokens
        accepted = s.num_spec_accepted_tokens - before.num_spec_accepted_tokens
        results[k] = {"output_tokens": tokens, "plain_s": round(times["plain"], 3), "spec_s": round(times["spec"], 3),
                      "plain_tok_s": round(tokens / times["plain"], 2), "spec_tok_s": round(tokens / times["spec"], 2),
                      "speedup": round(times["plain"] / times["spec"], 3),
                      "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
                      "tokens_per_verification": round(1 + accepted / drafts, 3) if drafts else 0.0,
                      "num_verifications": drafts, "num_draft_tokens": proposed}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[4],
                        help="draft tokens per step; a comma list runs each in turn (default 4)")
    parser.add_argument("--lookup-max", type=int, default=3)
    parser.add_argument("--lookup-min", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1, help="requests run together (one batch at a time)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/speculative.json")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run(args)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "machine": machine(),
               "args": {**vars(args)}, "results": {str(k): r for k, r in results.items()},
               "load_avg_end": os.getloadavg()[0]}
    write_json(args.out, summary)
    best_k = max(results, key=lambda k: results[k]["speedup"])
    r = results[best_k]
    others = ", ".join(f"k={k} {v['speedup']:.2f}x" for k, v in results.items() if k != best_k)
    print(f"speculative bench, c={args.concurrency}, {args.num_prompts} code prompts, {r['output_tokens']} tokens: "
          f"ngram k={best_k} "
          f"{r['spec_tok_s']:.1f} vs plain {r['plain_tok_s']:.1f} output tok/s ({r['speedup']:.2f}x), acceptance "
          f"{r['acceptance_rate']:.0%}, {r['tokens_per_verification']:.2f} tokens/verification"
          + (f" ({others})" if others else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
