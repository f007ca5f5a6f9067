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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig(model="", data="", output="")
    parser.add_argument("--model", default="smollm2", help="catalogue name (smollm2) or local HF folder")
    parser.add_argument("--data", required=True, help="training records: Alpaca JSON/JSONL, OpenAI messages, ShareGPT")
    parser.add_argument("--output", required=True, help="output folder (servable model; adapter/ with --lora)")
    parser.add_argument("--eval-data", help="held-out records: loss, perplexity, exact match of base vs tuned")
    parser.add_argument("--max-eval-examples", type=int, help="evaluate on the first N held-out records only")
    parser.add_argument("--template", choices=["chat", "alpaca"], default=d.template,
                        help="chat: the model's chat template (as served); alpaca: the Alpaca prompt")
    parser.add_argument("--train-on-inputs", action="store_true", help="also supervise prompt tokens")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example / packed row")
    parser.add_argument("--no-packing", dest="packing", action="store_false", help="pad batches instead of packing")
    parser.add_argument("--packing-strategy", choices=["ff", "ffd"], default=d.packing_strategy,
                        help="ff: first-fit in shuffled order (rows mix lengths); ffd: first-fit decreasing (densest)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="examples (padded) or packed rows per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the steps)")
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor as a share of lr")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) and export them merged")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--lora-targets", default=d.lora_targets, help='"all-linear" or e.g. q_proj,v_proj')
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--save-every", type=int, default=d.save_every, help="atomic checkpoint every N steps and at the end (0: none)")
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", dest="num_threads", type=int,
                        help="torch CPU threads (default: the cores the load average leaves free, at least 1)")
    parser.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    names = FinetuneConfig.__dataclass_fields__
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


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
