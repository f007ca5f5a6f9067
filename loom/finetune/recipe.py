"""The finetuning recipe end to end: load, evaluate the base model, train (full or LoRA), export, evaluate the export.

    summary = finetune(FinetuneConfig(model="smollm2", data="train.jsonl", eval_data="eval.jsonl",
                                      output="out", lora=True, max_steps=100))

The tuned model is evaluated after reloading the exported folder with ``AutoModelForCausalLM`` and its own chat
template, i.e. exactly what ``loom serve --model out`` loads.

Under several ranks (``--nproc-per-node`` or torchrun) every rank runs ``finetune``: all train, rank 0 alone
evaluates, reports and exports (the others return ``{}``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from loom.devices import resolve_device
from loom.finetune.config import FinetuneConfig
from loom.finetune.dataset import load_examples
from loom.finetune.distributed import Ranks, check_distributed, process_group, rank_device, ranks_from_env, unshard
from loom.finetune.evaluate import EvalReport, evaluate
from loom.finetune.export import export_adapter, export_model
from loom.finetune.formats import load_records
from loom.finetune.grpo import GRPOTrainer, Rollouts, encode_prompts, load_prompts, reward_eval
from loom.finetune.lora import apply_lora, merge_lora, num_trainable
from loom.finetune.mc_eval import MCReport, load_mc_records, mc_evaluate
from loom.finetune.modeling import auto_threads, load_model, seed_everything
from loom.finetune.preference import PreferenceTrainer, encode_pairs, load_pairs
from loom.finetune.reporting import Reporters, make_reporter
from loom.finetune.rewards import RewardSet
from loom.finetune.template import chat_template_for, check_tokenizer
from loom.finetune.trainer import Trainer
from loom.models.catalogue import resolve_model

log = logging.getLogger(__name__)


def _evaluate(model, tokenizer, records: list[dict], cfg: FinetuneConfig, template: str, label: str) -> EvalReport:
    t0 = time.perf_counter()
    report = evaluate(model, tokenizer, records, template=template, max_length=cfg.max_length,
                      batch_size=cfg.eval_batch_size)
    log.info("%s: %s (%.0f s)", label, report.summary(), time.perf_counter() - t0)
    return report


def _mc_evaluate(model, tokenizer, records: list[dict], cfg: FinetuneConfig, label: str) -> MCReport:
    t0 = time.perf_counter()
    report = mc_evaluate(model, tokenizer, records, template=cfg.template, batch_size=cfg.eval_batch_size,
                         max_length=cfg.max_length)
    log.info("%s multiple choice: %s (%.0f s)", label, report.line(), time.perf_counter() - t0)
    return report


def per_task(records: list[dict], report: EvalReport) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for record, pred in zip(records, report.predictions):
        groups.setdefault(record.get("task", "all"), []).append(pred["correct"])
    return {task: sum(v) / len(v) for task, v in sorted(groups.items())}


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the whole recipe; returns the summary also written to ``output/loom_finetune.json`` ({} on ranks > 0)."""
    ranks = ranks_from_env()
    check_distributed(ranks.world_size, batch_size=cfg.batch_size)
    if not ranks.is_main:
        logging.getLogger("loom").setLevel(logging.WARNING)
    torch.set_num_threads(cfg.num_threads or max(1, auto_threads() // ranks.local_world_size))
    log.info("torch threads: %d%s", torch.get_num_threads(),
             f" per rank, {ranks.world_size} ranks ({cfg.parallelism})" if ranks.is_distributed else "")
    device = rank_device(resolve_device(cfg.device), ranks)
    with process_group(ranks, device, cfg.dist_timeout):
        return _finetune(cfg, ranks, device)


def _finetune(cfg: FinetuneConfig, ranks: Ranks, device: torch.device) -> dict:
    seed_everything(cfg.seed)
    model_path = resolve_model(cfg.model)
    model, tokenizer = load_model(model_path, device, cfg.gradient_checkpointing)
    check_tokenizer(tokenizer)
    chat_template = chat_template_for(tokenizer, cfg.template)
    rollouts = rewards = None
    eval_prompts: list = []
    if cfg.method == "grpo":  # eval_data holds prompts: scored by the reward functions on greedy completions
        max_prompt = cfg.max_length - cfg.max_completion_length
        examples, skipped = load_prompts(cfg.data, tokenizer, template=cfg.template, max_prompt_tokens=max_prompt)
        rewards = RewardSet(cfg.reward_funcs, cfg.reward_weights, device, cfg.max_completion_length)
        rewards.check_records([p.columns for p in examples])
        eval_prompts = encode_prompts(_eval_records(cfg), tokenizer, template=cfg.template,
                                      max_prompt_tokens=max_prompt)[0]
        rewards.check_records([p.columns for p in eval_prompts])
        eval_records, eval_pairs = [], []
        rollouts = Rollouts(model_path, cfg, device)
    elif cfg.is_preference:  # eval_data holds preference pairs too: scored by rewards, not by greedy exact match
        examples, skipped = load_pairs(cfg.data, tokenizer, template=cfg.template, max_length=cfg.max_length)
        eval_pairs = encode_pairs(_eval_records(cfg), tokenizer, template=cfg.template,
                                  max_length=cfg.max_length)[0]
        eval_records = []
    else:
        examples, skipped = load_examples(cfg.data, tokenizer, template=cfg.template,
                                          train_on_inputs=cfg.train_on_inputs, max_length=cfg.max_length)
        eval_records, eval_pairs = _eval_records(cfg) if ranks.is_main else [], []
    base = _evaluate(model, tokenizer, eval_records, cfg, cfg.template, "base") if eval_records else None
    mc_records = load_mc_records(cfg.mc_eval_data) if cfg.mc_eval_data and ranks.is_main else []
    base_mc = _mc_evaluate(model, tokenizer, mc_records, cfg, "base") if mc_records else None
    seed_everything(cfg.seed)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)
    trainable, total = num_trainable(model)
    log.info("training %d of %d parameters on %d examples (%d skipped)", trainable, total, len(examples), skipped)
    reporter = make_reporter(cfg) if ranks.is_main else Reporters([])
    preference_eval = reward_evals = None
    try:
        if cfg.method == "grpo":
            base_reward = _reward_eval(rollouts, eval_prompts, rewards, "base")
            result = GRPOTrainer(cfg, model, tokenizer, examples, rewards, rollouts, reporter=reporter).fit()
            if eval_prompts:
                rollouts.sync(model)
                reward_evals = {"base": base_reward, "tuned": _reward_eval(rollouts, eval_prompts, rewards, "tuned")}
        elif cfg.is_preference:
            trainer = PreferenceTrainer(cfg, model, tokenizer, examples, reporter=reporter, ranks=ranks)
            held_out_ref = None  # a precomputed reference must come from the start model: before training
            if eval_pairs and trainer.reference_mode == "precompute":
                held_out_ref = trainer.precompute_reference(eval_pairs)
            base_pref = _preference_eval(trainer, eval_pairs, held_out_ref, "base")
            result = trainer.fit()
            tuned_pref = _preference_eval(trainer, eval_pairs, held_out_ref, "tuned")
            if eval_pairs:
                preference_eval = {"base": base_pref, "tuned": tuned_pref}
        else:
            result = Trainer(cfg, model, tokenizer, examples, reporter=reporter, ranks=ranks).fit()
    finally:
        reporter.close()
    if ranks.is_distributed and cfg.parallelism == "fsdp":
        model = unshard(model, lambda: _plain_model(model_path, cfg), ranks)
    if not ranks.is_main:
        return {}
    output = Path(cfg.output)
    if cfg.lora:
        export_adapter(model, output)
        model = merge_lora(model)
    summary = {
        "config": cfg.to_dict(), "base_model": str(model_path), "num_examples": len(examples),
        "num_skipped": skipped, "trainable_params": trainable, "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None, "train_tokens_per_s": result.tokens_per_s,
        "train_seconds": result.elapsed_s,
    }
    if cfg.is_preference:
        summary["train_pairs_per_s"] = result.pairs_per_s
    if reward_evals:
        summary["reward_eval"] = reward_evals
        (output / "eval.json").write_text(json.dumps(reward_evals, indent=2, default=str))
    if preference_eval:
        summary["preference_eval"] = preference_eval
        (output / "eval.json").write_text(json.dumps(preference_eval, indent=2))
    export_model(model, tokenizer, output, chat_template, summary)
    if eval_records or mc_records:
        del model
        tuned_model, tuned_tok = load_model(output, device)  # exactly the exported folder, its own chat template
    if eval_records:
        tuned = _evaluate(tuned_model, tuned_tok, eval_records, cfg, cfg.template, "tuned")
        summary["eval"] = _eval_summary(eval_records, base, tuned)
        (output / "eval.json").write_text(json.dumps({**summary["eval"], "predictions": tuned.predictions[:50]},
                                                     indent=2))
    if mc_records:
        tuned_mc = _mc_evaluate(tuned_model, tuned_tok, mc_records, cfg, "tuned")
        summary["mc_eval"] = {"base": base_mc.summary(), "tuned": tuned_mc.summary()}
        predictions = {"base": base_mc.predictions, "tuned": tuned_mc.predictions}
        (output / "mc_eval.json").write_text(json.dumps({**summary["mc_eval"], "predictions": predictions}, indent=2))
    (output / "loom_finetune.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _plain_model(model_path: Path, cfg: FinetuneConfig):
    """The model as built for training, unsharded on the CPU (to export FSDP2's gathered weights)."""
    model, _ = load_model(model_path, torch.device("cpu"))
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)
    return model


def _reward_eval(rollouts: Rollouts, prompts: list, rewards: RewardSet, label: str) -> dict | None:
    if not prompts:
        return None
    t0 = time.perf_counter()
    report = reward_eval(rollouts, prompts, rewards)
    log.info("%s: mean reward %.3f over %d held-out prompts (greedy), %s (%.0f s)", label, report["reward"],
             len(prompts), ", ".join(f"{n} {report[f'rewards/{n}']:.3f}" for n in rewards.names),
             time.perf_counter() - t0)
    return report


def _preference_eval(trainer: PreferenceTrainer, pairs: list[dict], reference, label: str) -> dict | None:
    if not pairs:
        return None
    t0 = time.perf_counter()
    report = trainer.evaluate(pairs, reference)
    log.info("%s: reward accuracy %.3f (ties 1/2: %.3f), margin %.3f, chosen preferred by log-prob %.3f (%.0f s)",
             label, report["rewards/accuracy"], report["rewards/accuracy_ties_half"], report["rewards/margins"],
             report["logps/preference_accuracy"], time.perf_counter() - t0)
    return report


def _eval_records(cfg: FinetuneConfig) -> list[dict]:
    if not cfg.eval_data:
        return []
    records = load_records(cfg.eval_data)
    return records[: cfg.max_eval_examples] if cfg.max_eval_examples else records


def _eval_summary(records: list[dict], base: EvalReport, tuned: EvalReport) -> dict:
    return {
        "base": {**base.summary(), "exact_match_by_task": per_task(records, base)},
        "tuned": {**tuned.summary(), "exact_match_by_task": per_task(records, tuned)},
    }
