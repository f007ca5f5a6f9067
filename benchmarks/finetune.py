"""Finetuning throughput: packed vs padded batches, and Loom vs TRL's SFTTrainer, on SmolLM2-135M on CPU.

    nice -n 10 .venv/bin/python benchmarks/finetune.py                  # both parts, ~10-20 min on 2 shared cores
    nice -n 10 .venv/bin/python benchmarks/finetune.py --parts packing  # only packed vs padded

The "trl" part needs TRL and datasets (``pip install -e '.[peers]'`` in this venv); without them it is skipped with a
note in the summary line and the JSON, and the packing part still runs.

Part "packing": one epoch of LoRA training over the same seeded records with a realistic (long-tailed, Alpaca-like)
length mix, once with padded batches (8 examples padded to the longest) and once packed (rows of max_length tokens,
block-diagonal mask); the figure is real (non-padding) tokens per second, the target >= 2x.

Part "trl": Loom's Trainer and TRL's SFTTrainer on the same model, LoRA config, records, batch size, steps and
thread count, back to back in this process; both mask the prompt (TRL: prompt-completion conversational records,
``completion_only_loss``) and both are run padded and packed (TRL: ``packing=True``, BFD + padding-free position
ids, which transformers turns into a block-diagonal SDPA mask). The figure is supervised (response) tokens per second
over the timed steps (the first step is warm-up); the target is Loom >= TRL.

Prints ONE summary line and writes ``results/finetune.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool (see loom/finetune/cli.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for scripts/
from loom.finetune.config import FinetuneConfig  # noqa: E402
from loom.finetune.dataset import encode_records  # noqa: E402
from loom.finetune.lora import apply_lora  # noqa: E402
from loom.finetune.recipe import load_model  # noqa: E402
from loom.finetune.trainer import Trainer  # noqa: E402
from loom.models.catalogue import resolve_model  # noqa: E402
from scripts.finetune_demo_data import WORDS, generate  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.0, targets="all-linear")


def length_mix_records(n: int, seed: int) -> list[dict]:
    """Alpaca-like lengths: short instructions, optional inputs, long-tailed responses (lognormal word counts:
    median ~50 words, 1 in 10 over ~230, capped at 450; Alpaca's answers range from one word to essays)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, k)))

    records = []
    for _ in range(n):
        context = words(int(rng.lognormvariate(3.0, 0.8))) if rng.random() < 0.4 else ""
        records.append({"instruction": words(rng.randint(5, 25)), "input": context,
                        "output": words(min(450, int(rng.lognormvariate(3.9, 1.2))))})
    return records


def fresh_lora_model(path, seed: int):
    torch.manual_seed(seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    return apply_lora(model, **LORA), tokenizer


def loom_epoch(path, records, packing: bool, args, strategy: str = "ff") -> dict:
    model, tokenizer = fresh_lora_model(path, args.seed)
    examples, _ = encode_records(records, tokenizer, max_length=args.max_length)
    cfg = FinetuneConfig(model=str(path), data="-", output=str(args.tmp / "packing"), lora=True, lr=2e-4,
                         packing=packing, batch_size=args.batch_size if not packing else args.rows,
                         max_length=args.max_length, epochs=1.0, progress=False, seed=args.seed,
                         packing_strategy=strategy)
    trainer = Trainer(cfg, model, tokenizer, examples)
    processed = sum(b.input_ids.numel() for b in itertools.islice(trainer.micro_batches(), trainer.total_steps))
    result = trainer.fit()
    return {"packing": packing, "strategy": strategy if packing else None, "steps": result.steps,
            "real_tokens": result.num_tokens,
            "processed_tokens": processed, "real_share": round(result.num_tokens / processed, 3),
            "seconds": round(result.elapsed_s, 2), "tokens_per_s": round(result.tokens_per_s, 2)}


def part_packing(path, args) -> dict:
    records = length_mix_records(args.mix_examples, args.seed)
    padded = loom_epoch(path, records, False, args)
    packed = loom_epoch(path, records, True, args, "ff")  # the trainer's default
    packed_ffd = loom_epoch(path, records, True, args, "ffd")
    return {"padded": padded, "packed": packed, "packed_ffd": packed_ffd,
            "speedup": round(packed["tokens_per_s"] / padded["tokens_per_s"], 2),
            "speedup_ffd": round(packed_ffd["tokens_per_s"] / padded["tokens_per_s"], 2)}


def conversational(records: list[dict]) -> list[dict]:
    def user(r):
        return r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")

    return [{"prompt": [{"role": "user", "content": user(r)}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in records]


def timed_loom(path, records, packing: bool, args) -> dict:
    model, tokenizer = fresh_lora_model(path, args.seed)
    examples, _ = encode_records(records, tokenizer, max_length=args.trl_max_length)
    cfg = FinetuneConfig(model=str(path), data="-", output=str(args.tmp / "loom"), lora=True, lr=2e-4,
                         packing=packing, batch_size=args.batch_size, max_length=args.trl_max_length,
                         max_steps=args.steps, warmup_steps=1, progress=False, seed=args.seed)
    trainer = Trainer(cfg, model, tokenizer, examples)
    stream = trainer.micro_batches()
    times, supervised, tokens = [], [], []
    for _ in range(args.steps):
        batch = next(stream)
        t0 = time.perf_counter()
        stats = trainer.train_step([batch])
        times.append(time.perf_counter() - t0)
        supervised.append(stats.num_supervised)
        tokens.append(stats.num_tokens)
    return summarise("loom", packing, times, supervised, tokens)


def timed_trl(path, records, packing: bool, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    times, supervised, tokens = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    class CountingSFT(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            supervised.append(int((inputs["labels"][:, 1:] != -100).sum()))
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **k)

    config = SFTConfig(
        output_dir=str(args.tmp / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=1, max_length=args.trl_max_length,
        packing=packing, completion_only_loss=True, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        logging_steps=1000, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, max_grad_norm=1.0,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = CountingSFT(model=model, args=config, train_dataset=Dataset.from_list(conversational(records)),
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return summarise("trl", packing, times, supervised, tokens)


def summarise(name: str, packing: bool, times: list[float], supervised: list[int], tokens: list[int]) -> dict:
    t, s = sum(times[1:]), sum(supervised[1:])  # the first step is warm-up
    return {"trainer": name, "packing": packing, "timed_steps": len(times) - 1, "seconds": round(t, 2),
            "supervised_tokens": s, "real_tokens": sum(tokens[1:]), "supervised_tokens_per_s": round(s / t, 2),
            "step_seconds_median": round(statistics.median(times[1:]), 3)}


def part_trl(path, args) -> dict:
    train, _ = generate(args.trl_examples, 4, seed=args.seed)
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in train]
    out = {}
    for packing in (False, True):  # back to back, Loom then TRL, for each batching mode
        loom = timed_loom(path, records, packing, args)
        trl = timed_trl(path, records, packing, args)
        key = "packed" if packing else "padded"
        out[key] = {"loom": loom, "trl": trl,
                    "ratio": round(loom["supervised_tokens_per_s"] / trl["supervised_tokens_per_s"], 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--parts", default="packing,trl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per padded batch (both trainers)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows of max_length per micro-batch (packing part)")
    parser.add_argument("--trl-max-length", type=int, default=128,
                        help="Loom vs TRL: truncation length and packed row length (both trainers)")
    parser.add_argument("--mix-examples", type=int, default=32)
    parser.add_argument("--trl-examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="results/finetune.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.tmp = Path(args.out).parent / "finetune-bench-tmp"
    path = resolve_model(args.model)
    parts = set(args.parts.split(","))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
              "threads": args.threads, "load_avg_start": os.getloadavg()[0], "args": {k: str(v) for k, v in
                                                                                        vars(args).items()}}
    if "packing" in parts:
        result["packing"] = part_packing(path, args)
    if "trl" in parts:
        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            result["trl_skipped"] = f"{' and '.join(missing)} not installed (pip install -e '.[peers]')"
        else:
            result["trl"] = part_trl(path, args)
    result["load_avg_end"] = os.getloadavg()[0]
    shutil.rmtree(args.tmp, ignore_errors=True)  # trainers' scratch output (nothing is kept)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary_line(result))
    return 0


def summary_line(result: dict) -> str:
    parts = []
    if "packing" in result:
        p = result["packing"]
        parts.append(f"packed {p['packed']['tokens_per_s']:.1f} (ffd {p['packed_ffd']['tokens_per_s']:.1f}) vs padded "
                     f"{p['padded']['tokens_per_s']:.1f} real tok/s ({p['speedup']:.2f}x, ffd {p['speedup_ffd']:.2f}x)")
    if "trl" in result:
        for mode, r in result["trl"].items():
            parts.append(f"{mode}: loom {r['loom']['supervised_tokens_per_s']:.1f} vs trl "
                         f"{r['trl']['supervised_tokens_per_s']:.1f} supervised tok/s ({r['ratio']:.2f}x)")
    if "trl_skipped" in result:
        parts.append(f"trl part skipped: {result['trl_skipped']}")
    return ("finetune bench: " + "; ".join(parts)
            + f" [threads {result['threads']}, load {result['load_avg_start']:.1f}]")


if __name__ == "__main__":
    raise SystemExit(main())
