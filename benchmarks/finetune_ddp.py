"""DDP finetuning throughput on CPU: 1 rank x 2 threads vs 2 ranks x 1 thread on the same 2 cores, same global batch.

    nice -n 10 .venv/bin/python benchmarks/finetune_ddp.py                 # SmolLM2-135M, LoRA, ~3 min
    nice -n 10 .venv/bin/python benchmarks/finetune_ddp.py --full          # every weight trained (more to all-reduce)

Each run starts fresh processes the way ``loom finetune --nproc-per-node N`` does (``distributed.launch``; the
1-rank run too, so both pay the same start-up), loads the model, adds LoRA adapters (r 16, all linear layers) and
trains ``--steps`` optimizer steps on the same seeded records (Alpaca-like long-tailed lengths, packed rows of
``--max-length`` tokens, ``--rows`` rows per step, split across the ranks). Timed: steps 2.. (step 1 is warm-up), from
rank 0's clock at the end of each step; the figure is real (non-padding) tokens per second over those steps. The
configurations alternate (1, 2, 1, 2, ...) for ``--rounds`` rounds and each reports its median, so a load change on
the shared machine hits both. The final losses are printed next to each other too: the same data and the same
gradient on 1 or 2 ranks give the same loss curve (to float rounding).

Prints ONE summary line and writes ``results/finetune_ddp.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool (see loom/finetune/cli.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.finetune import length_mix_records  # noqa: E402
from loom.finetune.config import FinetuneConfig  # noqa: E402
from loom.finetune.dataset import encode_records  # noqa: E402
from loom.finetune.distributed import launch, process_group, ranks_from_env  # noqa: E402
from loom.finetune.lora import apply_lora  # noqa: E402
from loom.finetune.modeling import load_model  # noqa: E402
from loom.finetune.trainer import Trainer  # noqa: E402
from loom.models.catalogue import resolve_model  # noqa: E402


class StepClock:
    """A reporter that keeps (time at the end of the step, the step's real tokens, its loss) for each step."""

    def __init__(self):
        self.steps: list[tuple[float, int, float]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((time.perf_counter(), int(metrics["tokens"]), metrics["loss"]))

    def close(self) -> None:
        pass


def rank_main(path: str, args: argparse.Namespace, out: str) -> None:
    """One rank of one run: train, and on rank 0 write the step clock to ``out``."""
    ranks = ranks_from_env()
    torch.set_num_threads(args.threads_per_rank)
    with process_group(ranks, torch.device("cpu"), timeout_s=600):
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(path, torch.device("cpu"))
        if not args.full:
            model = apply_lora(model, r=16, alpha=32, dropout=0.0, targets="all-linear")
        examples, _ = encode_records(length_mix_records(args.examples, args.seed), tokenizer,
                                     max_length=args.max_length)
        cfg = FinetuneConfig(model=path, data="-", output=str(Path(out).parent / "scratch"), lora=not args.full,
                             lr=2e-4 if not args.full else 2e-5, batch_size=args.rows, max_length=args.max_length,
                             max_steps=args.steps, warmup_steps=1, progress=False, seed=args.seed)
        clock = StepClock()
        Trainer(cfg, model, tokenizer, examples, reporter=clock, ranks=ranks).fit()
        if ranks.is_main:
            Path(out).write_text(json.dumps(clock.steps))


def timed_run(path: str, nproc: int, args: argparse.Namespace, scratch: Path) -> dict:
    args.threads_per_rank = args.cores // nproc
    out = scratch / f"steps-{nproc}.json"
    t0 = time.perf_counter()
    launch(rank_main, (path, args, str(out)), nproc)
    wall = time.perf_counter() - t0
    steps = json.loads(out.read_text())
    (t_first, _, _), timed = steps[0], steps[1:]
    tokens = sum(n for _, n, _ in timed)
    return {"ranks": nproc, "threads_per_rank": args.threads_per_rank, "timed_steps": len(timed),
            "tokens": tokens, "seconds": round(timed[-1][0] - t_first, 3),
            "tokens_per_s": round(tokens / (timed[-1][0] - t_first), 2), "losses": [round(x, 6) for *_, x in steps],
            "wall_s_with_startup": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    parser.add_argument("--cores", type=int, default=2, help="threads in all: 1 rank x CORES vs 2 ranks x CORES/2")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run, the first one warm-up")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step (global batch), split over ranks")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/finetune_ddp.json")
    args = parser.parse_args(argv)
    path = str(resolve_model(args.model))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
              "torch": torch.__version__, "load_avg_start": os.getloadavg()[0],
              "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="loom-ddp-bench-") as scratch:
        for _ in range(args.rounds):
            for nproc in (1, 2):
                result["runs"].append(timed_run(path, nproc, args, Path(scratch)))
    for nproc in (1, 2):
        runs = [r for r in result["runs"] if r["ranks"] == nproc]
        result[f"ranks_{nproc}"] = {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
                                    "final_loss": runs[0]["losses"][-1]}
    result["speedup"] = round(result["ranks_2"]["tokens_per_s_median"] / result["ranks_1"]["tokens_per_s_median"], 3)
    result["load_avg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary_line(result))
    return 0


def summary_line(result: dict) -> str:
    one, two = result["ranks_1"], result["ranks_2"]
    mode = "full" if result["args"]["full"] == "True" else "LoRA"
    return (f"DDP {mode}: 1 rank x {result['runs'][0]['threads_per_rank']} threads {one['tokens_per_s_median']:.1f} "
            f"tok/s vs 2 ranks x {result['runs'][1]['threads_per_rank']} thread "
            f"{two['tokens_per_s_median']:.1f} tok/s ({result['speedup']:.2f}x); final loss {one['final_loss']:.4f} "
            f"vs {two['final_loss']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
