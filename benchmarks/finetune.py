"""Finetuning throughput on SmolLM2-135M on CPU: packed vs padded batches, and Loom vs TRL (SFTTrainer, DPOTrainer).

    nice -n 10 .venv/bin/python benchmarks/finetune.py                  # SFT: parts packing and trl, ~10-20 min
    nice -n 10 .venv/bin/python benchmarks/finetune.py --parts packing  # only packed vs padded
    nice -n 10 .venv/bin/python benchmarks/finetune.py --method dpo --threads 1   # DPO vs TRL, ~6-10 min

The "trl" and "dpo" parts need TRL and datasets, installed into this venv without touching torch or transformers
(check first with ``--dry-run`` that it only adds packages)::

    .venv/bin/pip install trl 'torch==2.13.0'      # trl 1.16.0 adds datasets, pyarrow, dill, multiprocess, xxhash

(not ``.[peers]``: its serving peers pull newer fastapi/starlette than Loom pins). Without them those parts are skipped
with a note in the summary line and the JSON, and the packing part still runs.

Part "packing": one epoch of LoRA training over the same seeded records with a realistic (long-tailed, Alpaca-like)
length mix, once with padded batches (8 examples padded to the longest) and once packed (rows of max_length tokens,
block-diagonal mask); the figure is real (non-padding) tokens per second, the target >= 2x.

Part "trl": Loom's Trainer and TRL's SFTTrainer on the same model, LoRA config, records, batch size, steps and
thread count, back to back in this process; both mask the prompt (TRL: prompt-completion conversational records,
``completion_only_loss``) and both are run padded and packed (TRL: ``packing=True``, BFD + padding-free position
ids, which transformers turns into a block-diagonal SDPA mask). The figure is supervised (response) tokens per second
over the timed steps (the first step is warm-up); the target is Loom >= TRL. TRL runs without gradient checkpointing,
like Loom (TRL 1.x turns it on by default, which recomputes every block's forward in backward).

Part "dpo" (``--method dpo``): Loom's PreferenceTrainer and TRL's DPOTrainer, sigmoid loss, beta 0.1, the same
model, LoRA config (r 16, alpha 32, all linear layers, fresh adapters), thread count, fp32, no gradient checkpointing,
back to back in this process, for each data set: "demo" (scripts/dpo_demo_data.py: short answers, 45-95 tokens a
side) and "mix" (long-tailed Alpaca-like prompts and responses, truncated at ``--dpo-max-length``). Both get the same
conversational records (prompt = user turn, chosen / rejected = one assistant turn), rendered with the model's chat
template, only the response supervised, right-truncated at the same max_length, and the same batches: TRL reads the
records in the order Loom's steps took them (sequential sampler), so every step has the same pairs, padded to the
longest of its 2B rows. Same work per step in both: ONE policy forward over the 2B chosen + rejected rows with grad,
ONE reference forward over the same rows with the LoRA adapters switched off (no grad; ``--dpo-reference
precompute``: neither does it per step, both compute it once before training, reported as setup_s), one backward, AdamW
and clipping. Known differences: TRL's tokenization keeps the newline after ``<|im_end|>`` in the completion, so its
rows are one token longer and it supervises one more token per side (``row_length_trl_minus_loom`` in the JSON); TRL
scores the LM head at every position in vocabulary chunks (its fused head, non-compact off CUDA, recomputed in
backward) and also computes per-token entropy, mean logit and top-1 for its logs, where Loom runs the head only at
supervised positions; TRL's first step has lr 0 (its warm-up starts at 0), so later losses differ slightly. The figure
is preference pairs per second over the timed steps (the first step is warm-up), also per CPU second of this process
(less disturbed by other jobs on shared cores) and real tokens per second; the target is Loom >= 1.2x TRL.

Prints ONE summary line and writes ``results/finetune.json`` (``--method dpo``: ``results/finetune-dpo.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool (see loom/finetune/cli.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
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
from loom.finetune.modeling import load_model  # noqa: E402
from loom.finetune.preference import PreferenceTrainer, encode_pairs  # noqa: E402
from loom.finetune.trainer import Trainer  # noqa: E402
from loom.models.catalogue import resolve_model  # noqa: E402
from scripts.dpo_demo_data import generate_pairs  # noqa: E402
from scripts.finetune_demo_data import WORDS, generate  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.0, targets="all-linear")
INSTALL_TRL = ".venv/bin/pip install trl 'torch==2.13.0'"


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


def user_turn(record: dict) -> str:
    """An Alpaca record's user turn as Loom renders it (instruction, blank line, input)."""
    return record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")


def conversational(records: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": user_turn(r)}],
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
        gradient_checkpointing=False,  # TRL >= 1.x defaults to True (a second forward per block); Loom: off
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


def preference_records(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` conversational preference records (TRL's format, which Loom also reads). "demo": the DPO demo's pairs
    (scripts/dpo_demo_data.py: the bare answer chosen, a chatty and sometimes wrong one rejected; 45-95 tokens a
    side). "mix": long-tailed Alpaca-like prompts and responses (``length_mix_records``), chosen = the record's
    output, rejected = an independent draw from the same length distribution (50-500+ tokens a side)."""
    if kind == "demo":
        train, _ = generate_pairs(n, 1, seed)
        flat = [(r["prompt"], r["chosen"], r["rejected"]) for r in train]
    elif kind == "mix":
        rng = random.Random(seed + 1)

        def draw() -> str:
            return " ".join(rng.choice(WORDS) for _ in range(max(1, min(450, int(rng.lognormvariate(3.9, 1.2))))))

        flat = [(user_turn(r), r["output"], draw()) for r in length_mix_records(n, seed)]
    else:
        raise ValueError(f"--dpo-data takes demo or mix, got {kind!r}")
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in flat]


def timed_loom_dpo(path, records: list[dict], args) -> tuple[dict, list[dict]]:
    """Loom's PreferenceTrainer, timed per ``train_step`` like ``timed_loom``; also returns its records, those its
    steps took first and in that order, then the others (so that TRL's sequential sampler gives the same batches, and
    both tokenize, and with a precomputed reference score, the same pairs)."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    t0 = time.perf_counter()
    model = apply_lora(model, **LORA)
    encoded = [encode_pairs([r], tokenizer, max_length=args.dpo_max_length)[0] for r in records]
    kept = [i for i, e in enumerate(encoded) if e]  # a pair whose response truncation removed is skipped
    pairs = [encoded[i][0] for i in kept]
    cfg = FinetuneConfig(model=str(path), data="-", output=str(args.tmp / "loom-dpo"), method="dpo", beta=args.beta,
                         reference=args.dpo_reference, lora=True, lr=args.dpo_lr, packing=False,
                         batch_size=args.dpo_batch_size, eval_batch_size=args.dpo_batch_size,
                         max_length=args.dpo_max_length, max_steps=args.steps, warmup_steps=1, progress=False,
                         seed=args.seed)
    trainer = PreferenceTrainer(cfg, model, tokenizer, pairs)
    if args.dpo_reference == "precompute":  # what fit() does first; TRL does it in its constructor
        trainer.reference = trainer.precompute_reference()
    setup_s = time.perf_counter() - t0
    stream = trainer.micro_batches()
    log = StepLog()
    order: list[int] = []
    for _ in range(args.steps):
        pb = next(stream)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = trainer.train_step([pb])
        log.times.append(time.perf_counter() - t0)
        log.cpu_times.append(time.process_time() - c0)
        log.add(pairs=pb.num_pairs, supervised=stats.num_supervised, tokens=stats.num_tokens,
                shape=list(pb.batch.input_ids.shape), loss=stats.loss)
        order += pb.pair_index.tolist()
    result = log.summary("loom", setup_s)
    result["skipped_pairs"] = len(records) - len(kept)
    rest = sorted(set(range(len(kept))) - set(order))
    return result, [records[kept[i]] for i in order + rest]


def timed_trl_dpo(path, records: list[dict], args) -> dict:
    """TRL's DPOTrainer on ``records`` in the given order (sequential sampler): the same batches as Loom's run."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    log = StepLog()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            log.times.append(time.perf_counter() - self.t0)
            log.cpu_times.append(time.process_time() - self.c0)

    class CountingDPO(DPOTrainer):
        def training_step(self, model, inputs, *a, **k):
            ids = inputs["input_ids"]  # [2B, T]: the B chosen rows, then the B rejected rows
            loss = super().training_step(model, inputs, *a, **k)
            log.add(pairs=ids.shape[0] // 2, supervised=int(inputs["completion_mask"][:, 1:].sum()),
                    tokens=int(inputs["attention_mask"].sum()), shape=list(ids.shape), loss=float(loss))
            return loss

    config = DPOConfig(
        output_dir=str(args.tmp / "trl-dpo"), max_steps=args.steps, per_device_train_batch_size=args.dpo_batch_size,
        learning_rate=args.dpo_lr, lr_scheduler_type="cosine", warmup_steps=1, beta=args.beta, loss_type=["sigmoid"],
        max_length=args.dpo_max_length, truncation_mode="keep_start", padding_free=False,
        precompute_ref_log_probs=args.dpo_reference == "precompute", precompute_ref_batch_size=args.dpo_batch_size,
        train_sampling_strategy="sequential", gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=1000, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
        max_grad_norm=1.0,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = CountingDPO(model=model, args=config, train_dataset=Dataset.from_list(records),
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    setup_s = time.perf_counter() - t0
    trainer.train()
    result = log.summary("trl", setup_s)
    result["dropped_pairs"] = len(records) - len(trainer.train_dataset)
    return result


class StepLog:
    """Per-step figures of one trainer's run; ``summary`` drops the first (warm-up) step. ``cpu_times``: the process's
    CPU seconds (all its threads), which other jobs on shared cores disturb far less than wall time."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.steps: list[dict] = []

    def add(self, **step) -> None:
        self.steps.append(step)

    def summary(self, name: str, setup_s: float) -> dict:
        t, cpu, timed = sum(self.times[1:]), sum(self.cpu_times[1:]), self.steps[1:]
        pairs, supervised, tokens = (sum(s[k] for s in timed) for k in ("pairs", "supervised", "tokens"))
        processed = sum(s["shape"][0] * s["shape"][1] for s in timed)
        out = {"trainer": name, "timed_steps": len(self.times) - 1, "seconds": round(t, 2), "pairs": pairs,
               "pairs_per_s": round(pairs / t, 3), "cpu_seconds": round(cpu, 2),
               "pairs_per_cpu_s": round(pairs / cpu, 3), "real_tokens_per_s": round(tokens / t, 1),
               "supervised_tokens_per_s": round(supervised / t, 2), "real_tokens": tokens,
               "processed_tokens": processed, "supervised_tokens": supervised,
               "step_seconds_median": round(statistics.median(self.times[1:]), 3),
               "step_seconds": [round(x, 2) for x in self.times],
               "step_cpu_seconds": [round(x, 2) for x in self.cpu_times],
               "batch_shapes": [s["shape"] for s in self.steps], "losses": [round(s["loss"], 4) for s in self.steps]}
        out["setup_s"] = round(setup_s, 2)  # LoRA, tokenizing (and, with --dpo-reference precompute, the reference)
        return out


def part_dpo(path, args) -> dict:
    out = {}
    for kind in args.dpo_data.split(","):  # back to back, Loom then TRL, for each data set
        records = preference_records(kind, args.dpo_pairs, args.seed)
        loom, ordered = timed_loom_dpo(path, records, args)
        trl = timed_trl_dpo(path, ordered, args)
        out[kind] = {"loom": loom, "trl": trl, "ratio": round(loom["pairs_per_s"] / trl["pairs_per_s"], 2),
                     "ratio_cpu_time": round(loom["pairs_per_cpu_s"] / trl["pairs_per_cpu_s"], 2),
                     # the same pairs in every batch; TRL's rows are one token longer (see the docstring)
                     "row_length_trl_minus_loom": [t[1] - m[1] for m, t in zip(loom["batch_shapes"],
                                                                                trl["batch_shapes"])]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", choices=("sft", "dpo"), default="sft",
                        help="sft: parts packing,trl (default); dpo: part dpo, Loom's DPO vs TRL's DPOTrainer")
    parser.add_argument("--parts", default=None, help="comma-separated, of packing, trl, dpo (default: by --method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per padded batch (both trainers)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows of max_length per micro-batch (packing part)")
    parser.add_argument("--trl-max-length", type=int, default=128,
                        help="Loom vs TRL: truncation length and packed row length (both trainers)")
    parser.add_argument("--mix-examples", type=int, default=32)
    parser.add_argument("--trl-examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="steps per trainer, the first one warm-up (trl, dpo)")
    parser.add_argument("--dpo-data", default="demo,mix", help="dpo: comma-separated, of demo (short answers), mix")
    parser.add_argument("--dpo-pairs", type=int, default=256, help="dpo: preference pairs generated per data set")
    parser.add_argument("--dpo-batch-size", type=int, default=4, help="dpo: pairs per step (2x rows), both trainers")
    parser.add_argument("--dpo-max-length", type=int, default=192, help="dpo: truncation of prompt + response")
    parser.add_argument("--dpo-reference", choices=("adapters", "precompute"), default="adapters",
                        help="dpo: reference log-probs from the model with LoRA off each step, or computed up front")
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="JSON (default: results/finetune.json, with dpo -dpo.json)")
    args = parser.parse_args(argv)
    args.parts = args.parts or ("dpo" if args.method == "dpo" else "packing,trl")
    args.out = args.out or ("results/finetune-dpo.json" if args.parts == "dpo" else "results/finetune.json")
    torch.set_num_threads(args.threads)
    args.tmp = Path(args.out).parent / "finetune-bench-tmp"
    path = resolve_model(args.model)
    parts = set(args.parts.split(","))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or "cpu",
              "threads": args.threads, "load_avg_start": os.getloadavg()[0], "args": {k: str(v) for k, v in
                                                                                        vars(args).items()}}
    if "packing" in parts:
        result["packing"] = part_packing(path, args)
    unknown = parts - {"packing", "trl", "dpo"}
    if unknown:
        parser.error(f"--parts takes packing, trl, dpo; got {', '.join(sorted(unknown))}")
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if "trl" in parts:
        if missing:
            result["trl_skipped"] = f"{' and '.join(missing)} not installed ({INSTALL_TRL})"
        else:
            result["trl"] = part_trl(path, args)
    if "dpo" in parts:
        if missing:
            result["dpo_skipped"] = f"{' and '.join(missing)} not installed ({INSTALL_TRL})"
        else:
            result["trl_version"] = importlib.metadata.version("trl")
            result["dpo"] = part_dpo(path, args)
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
    for data, r in result.get("dpo", {}).items():
        loom, trl = r["loom"], r["trl"]
        parts.append(f"dpo {data}: loom {loom['pairs_per_s']:.3f} vs trl {trl['pairs_per_s']:.3f} pairs/s "
                     f"({r['ratio']:.2f}x, by CPU time {r['ratio_cpu_time']:.2f}x; {loom['real_tokens_per_s']:.0f} vs "
                     f"{trl['real_tokens_per_s']:.0f} real tok/s, "
                     f"{loom['step_seconds_median']:.2f} vs {trl['step_seconds_median']:.2f} s/step)")
    if "dpo_skipped" in result:
        parts.append(f"dpo part skipped: {result['dpo_skipped']}")
    return ("finetune bench: " + "; ".join(parts)
            + f" [threads {result['threads']}, load {result['load_avg_start']:.1f}]")


if __name__ == "__main__":
    raise SystemExit(main())
