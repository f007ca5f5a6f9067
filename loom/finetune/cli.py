"""``loom finetune``: instruction-finetune a causal LM (full or LoRA) and export a folder ``loom serve`` loads.

    loom finetune --model smollm2 --data train.jsonl --eval-data eval.jsonl --output out --lora --max-steps 100
    loom finetune --config recipe.yaml --max-steps 50     # settings from a YAML recipe; flags override it
    loom finetune ... --nproc-per-node 2                  # DDP over 2 processes (or: torchrun --no-python loom ...)
    loom serve --model out

The resolved settings go to ``OUTPUT/loom_finetune_config.yaml`` (rerun with ``--config`` that file), step metrics
to ``OUTPUT/logs/metrics.jsonl`` (and TensorBoard / wandb with ``--report-to``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from loom.finetune.config import FinetuneConfig
from loom.finetune.recipe_file import RESOLVED_RECIPE, load_recipe, resolve_config, write_recipe
from loom.finetune.reporting import check_report_to, where_logs_go
from loom.flags import add_config_arguments, given_args

CLI_DEFAULTS = {"model": "smollm2"}
"""Defaults of the command line that FinetuneConfig has not (a recipe overrides them, as flags do)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="RECIPE.yaml",
                        help="a YAML recipe: these settings as keys (max_steps: 100, or max-steps); flags given on the "
                             f"command line override it; the merged settings are written to OUTPUT/{RESOLVED_RECIPE}")
    # given_only: a flag left out sets nothing, so a flag given (even with its default value) overrides the recipe
    add_config_arguments(parser, FinetuneConfig, defaults=CLI_DEFAULTS, aliases={"num_threads": ["--threads"]},
                         given_only=True)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults, then the --config recipe, then the flags given on the command line."""
    recipe = load_recipe(args.config, aliases={"threads": "num_threads"}) if getattr(args, "config", None) else {}
    return resolve_config(recipe, given_args(FinetuneConfig, args), defaults=CLI_DEFAULTS)


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
    pref = summary.get("preference_eval")
    if pref:
        print(f"{'model':<6} {'loss':>7} {'reward accuracy':>16} {'margin':>8} {'chosen more likely':>19}")
        for name in ("base", "tuned"):
            r = pref[name]
            print(f"{name:<6} {r['loss']:>7.4f} {r['rewards/accuracy_ties_half']:>16.3f} {r['rewards/margins']:>8.3f} "
                  f"{r['logps/preference_accuracy']:>19.3f}")
    rewards = summary.get("reward_eval")
    if rewards:
        names = [k for k in rewards["base"] if k.startswith("rewards/")]
        print(f"{'model':<6} {'reward':>7} {'length':>7}  " + " ".join(n.removeprefix("rewards/") for n in names)
              + f"  (greedy, {rewards['base']['prompts']} held-out prompts)")
        for name in ("base", "tuned"):
            r = rewards[name]
            print(f"{name:<6} {r['reward']:>7.3f} {r['completions/mean_length']:>7.1f}  "
                  + " ".join(f"{r[n]:.3f}" for n in names))
    mc = summary.get("mc_eval")
    if mc:
        print(f"{'model':<6} {'mc acc':>7} {'acc_norm':>9}  "
              f"(multiple choice by log-likelihood, {mc['base']['num_questions']} questions)")
        for name in ("base", "tuned"):
            print(f"{name:<6} {mc[name]['acc']:>7.3f} {mc[name]['acc_norm']:>9.3f}")
    print(f"model saved to {summary['config']['output']} (serve it: loom serve --model {summary['config']['output']})")


def train(cfg: FinetuneConfig) -> dict:
    """``finetune(cfg)`` here, or in ``cfg.nproc_per_node`` new processes (rank 0's summary is read from the output
    folder, where it wrote it)."""
    # local: these import torch, which must start after run() sets OMP_WAIT_POLICY; `loom finetune --help` skips it
    from loom.finetune.distributed import check_distributed, launch, ranks_from_env
    from loom.finetune.recipe import finetune

    if cfg.nproc_per_node == 1:
        return finetune(cfg)
    if ranks_from_env().is_distributed:
        raise ValueError("already one of several ranks (torchrun sets WORLD_SIZE): leave out --nproc-per-node, "
                         "torchrun's own --nproc-per-node starts the ranks")
    check_distributed(cfg.nproc_per_node, batch_size=cfg.batch_size)
    launch(_rank_main, (cfg,), cfg.nproc_per_node)
    return json.loads((Path(cfg.output) / "loom_finetune.json").read_text())


def _rank_main(cfg: FinetuneConfig) -> None:
    """One spawned rank: a new interpreter, so the logging set up by ``run`` is set up again."""
    from loom.finetune.recipe import finetune

    _setup_logging()
    finetune(cfg)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    # NOTE: with OpenMP's default busy-waiting, 2 torch threads on 2 shared cores ran 5-10x SLOWER than 1 thread
    # here (measured: greedy eval 70 s vs 5 s); passive waiting must be set before torch starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from loom.finetune.distributed import RankFailed  # local: imports torch, which must start after the line above

    _setup_logging()
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 writes and prints
    try:
        cfg = config_from_args(args)
        check_report_to(cfg)  # a missing tensorboard / wandb fails now, not after the model and data are loaded
        if is_main:
            recipe = write_recipe(cfg, Path(cfg.output) / RESOLVED_RECIPE)
            print(f"settings: {recipe} (rerun: loom finetune --config {recipe})")
            for line in where_logs_go(cfg):
                print(line)
        summary = train(cfg)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    except RankFailed as exc:
        print(f"error: {exc}")
        return 1
    if not summary:  # a rank other than 0 under torchrun
        return 0
    print_report(summary)
    evals = ("eval", "preference_eval", "reward_eval", "mc_eval")
    print(json.dumps({key: summary.get(key) for key in evals if summary.get(key)} or {"eval": None}, default=str))
    return 0
