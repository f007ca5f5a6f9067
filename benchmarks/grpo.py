"""GRPO on SmolLM2-135M-Instruct on CPU: Loom (rollouts through its own engine, in the training process) against
TRL's GRPOTrainer (rollouts through transformers' ``generate``: TRL without vLLM, the only way it runs on a CPU).

    nice -n 10 .venv/bin/python benchmarks/grpo.py               # both, ~10-15 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/grpo.py --steps 4     # a quick look

TRL comes as for benchmarks/finetune.py: ``.venv/bin/pip install trl 'torch==2.13.0'`` (trl 1.16.0 adds datasets,
pyarrow, dill, multiprocess, xxhash); without it the TRL part is skipped with a note in the summary and the JSON.

The same work in both, back to back in this process: the finetune demo's tasks (scripts/finetune_demo_data.py: sort,
reverse, extract a year, arithmetic) as conversational prompts (the user turn, rendered with the model's chat
template), the reward ``exact_match`` against the record's answer (Loom's built-in, handed to TRL as its reward
function: the same calling convention), LoRA r 16 / alpha 32 on every linear layer, fresh adapters, 4 prompts x 8
completions per step (TRL: per_device_train_batch_size 32, num_generations 8), at most 32 completion tokens,
temperature 1, top-p 1, beta 0 (no reference model), loss "dapo", advantages scaled by the group std, AdamW at 1e-4
with a cosine schedule after one warm-up step, gradient clipping at 1, float32, no gradient checkpointing, the same
thread count. The same prompts in the same steps: TRL reads the records in the order Loom's plan takes them
(``shuffle_dataset=False``). Each samples its own completions, so rewards differ by chance.

Figures: seconds per step (the median over the steps after the first, which is warm-up), completions per second over
those steps, and the share of a step spent sampling (Loom: ``GRPOTrainer.sample``; TRL: ``_generate``); the reward
per step of each. Prints ONE summary line and writes ``results/grpo.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool (see loom/finetune/cli.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_json  # noqa: E402
from loom.finetune.config import FinetuneConfig  # noqa: E402
from loom.finetune.grpo import GRPOTrainer, Rollouts, encode_prompts  # noqa: E402
from loom.finetune.lora import apply_lora  # noqa: E402
from loom.finetune.modeling import load_model, seed_everything  # noqa: E402
from loom.finetune.rewards import RewardSet, exact_match  # noqa: E402
from loom.models.catalogue import resolve_model  # noqa: E402
from scripts.finetune_demo_data import generate  # noqa: E402

LORA = {"r": 16, "alpha": 32}


def demo_prompts(n: int, seed: int) -> list[dict]:
    """TRL's conversational prompt-only records: the user turn, and the answer for the reward."""
    train, _ = generate(n, 4, seed=seed)
    prompts = []
    for r in train:
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        prompts.append({"prompt": [{"role": "user", "content": user}], "answer": r["output"], "task": r["task"]})
    return prompts


def config(args, output: str) -> FinetuneConfig:
    return FinetuneConfig(
        model="smollm2", data="-", output=output, method="grpo", reward_funcs=["exact_match"], num_generations=8,
        max_completion_length=args.max_completion_length, batch_size=args.prompts_per_step, grad_accum=1,
        max_steps=args.steps, lr=args.lr, warmup_steps=1, lora=True, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        temperature=1.0, max_length=256, seed=args.seed, progress=False, num_threads=args.threads)


def run_loom(path, records, args) -> tuple[dict, list[int]]:
    cfg = config(args, str(args.tmp / "loom"))
    seed_everything(args.seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    prompts, _ = encode_prompts(records, tokenizer)
    rollouts = Rollouts(path, cfg, torch.device("cpu"))
    seed_everything(args.seed)
    model = apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets="all-linear")
    trainer = GRPOTrainer(cfg, model, tokenizer, prompts, RewardSet(cfg.reward_funcs), rollouts)
    order = [i for micro in trainer._plan(0) for i in micro]
    times, sampling, rewards = [], [], []
    sample = trainer.sample

    def timed_sample(indices):
        t0 = time.perf_counter()
        out = sample(indices)
        sampling.append(time.perf_counter() - t0)
        return out

    trainer.sample = timed_sample
    step = trainer.train_step
    stream = trainer.micro_batches()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stats = step([next(stream)])
        times.append(time.perf_counter() - t0)
        rewards.append(round(stats.extra["reward"], 4))
    return summarise("loom", times, sampling, rewards, args), order


def run_trl(path, records, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    seed_everything(args.seed)
    model, tokenizer = load_model(path, torch.device("cpu"))
    times, sampling, rewards = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                rewards.append(round(float(logs["reward"]), 4))

    class TimedGRPO(TRLGRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            sampling.append(time.perf_counter() - t0)
            return out

    cfg = GRPOConfig(
        output_dir=str(args.tmp / "trl"), max_steps=args.steps, per_device_train_batch_size=8 * args.prompts_per_step,
        num_generations=8, max_completion_length=args.max_completion_length, temperature=1.0, top_p=1.0, beta=0.0,
        loss_type="dapo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1,
        max_grad_norm=1.0, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, gradient_checkpointing=False,
        shuffle_dataset=False)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = TimedGRPO(model=model, reward_funcs=[exact_match], args=cfg, train_dataset=Dataset.from_list(records),
                        processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return summarise("trl", times, sampling, rewards, args)


def summarise(name: str, times: list[float], sampling: list[float], rewards: list[float], args) -> dict:
    timed, timed_sampling = times[1:], sampling[1 : len(times)]  # the first step is warm-up
    completions = 8 * args.prompts_per_step * len(timed)
    return {"trainer": name, "timed_steps": len(timed), "step_seconds_median": round(statistics.median(timed), 3),
            "completions_per_s": round(completions / sum(timed), 2),
            "sampling_share": round(sum(timed_sampling) / sum(timed), 3),
            "sampling_seconds_median": round(statistics.median(timed_sampling), 3), "reward_per_step": rewards,
            "step_seconds": [round(t, 3) for t in times]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/grpo.json")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")
    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2")
    n = args.steps * args.prompts_per_step
    with tempfile.TemporaryDirectory(prefix="loom-grpo-bench-") as tmp:
        args.tmp = Path(tmp)
        records = demo_prompts(n, args.seed)
        loom, order = run_loom(path, records, args)
        result = {"loom": loom}
        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
            result["trl"] = {"skipped": "trl is not installed: .venv/bin/pip install trl 'torch==2.13.0'"}
        else:
            result["trl"] = run_trl(path, [records[i] for i in order], args)  # Loom's order, step by step
    trl = result["trl"]
    ratio = round(trl["step_seconds_median"] / loom["step_seconds_median"], 2) if "skipped" not in trl else None
    result.update({
        "speedup_step_time": ratio, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "trl")},
        "workload": {"model": "SmolLM2-135M-Instruct (float32)", "prompts_per_step": args.prompts_per_step,
                     "num_generations": 8, "max_completion_length": args.max_completion_length, "steps": args.steps,
                     "lora": LORA, "lr": args.lr, "reward": "exact_match"},
    })
    write_json(args.out, result)
    trl_part = (f"trl {trl['step_seconds_median']:.2f} s/step ({trl['sampling_share']:.0%} sampling), "
                f"Loom {ratio}x faster" if ratio else trl["skipped"])
    print(f"grpo: loom {loom['step_seconds_median']:.2f} s/step ({loom['sampling_share']:.0%} sampling, "
          f"{loom['completions_per_s']} completions/s), {trl_part}; {args.out}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
