"""``loom finetune``: instruction-finetune a causal LM (full or LoRA) and export a folder ``loom serve`` loads.

    loom finetune --model smollm2 --data train.jsonl --eval-data eval.jsonl --output out --lora --max-steps 100
    loom serve --model out
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from loom.finetune.config import FinetuneConfig
from loom.flags import add_config_arguments
from loom.flags import config_from_args as config_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, FinetuneConfig, defaults={"model": "smollm2"}, aliases={"num_threads": ["--threads"]})


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return config_from(FinetuneConfig, args)


def print_report(summary: dict) -> None:
    print(f"trained {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          f"{summary['train_tokens_per_s']:.0f} tokens/s, {summary['train_seconds']:.0f} s")
    ev = summary.get("eval")
    if ev:
        print(f"{'model':<6} {'loss':>7} {'ppl':>8} {'exact match':>12}  by task")
        for name in ("base", "tuned"):
            r = ev[name]
            tasks = " ".join(f"{t}={v:.2f}" for t, v in r["exact_match_by_task"].items())
            print(f"{name:<6} {r['loss']:>7.4f} {r['perplexity']:>8.3f} {r['exact_match']:>12.3f}  {tasks}")
    print(f"model saved to {summary['config']['output']} (serve it: loom serve --model {summary['config']['output']})")


def run(args: argparse.Namespace) -> int:
    # NOTE: with OpenMP's default busy-waiting, 2 torch threads on 2 shared cores ran 5-10x SLOWER than 1 thread
    # here (measured: greedy eval 70 s vs 5 s); passive waiting must be set before torch starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # local: the recipe imports torch, which must start after the line above; `loom finetune --help` skips it
    from loom.finetune.recipe import finetune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        summary = finetune(cfg)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print_report(summary)
    print(json.dumps({"eval": summary.get("eval")}, default=str))
    return 0
