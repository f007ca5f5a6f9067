"""The finetuning recipe end to end: load, evaluate the base model, train (full or LoRA), export, evaluate the export.

    summary = finetune(FinetuneConfig(model="smollm2", data="train.jsonl", eval_data="eval.jsonl",
                                      output="out", lora=True, max_steps=100))

The tuned model is evaluated after reloading the exported folder with ``AutoModelForCausalLM`` and its own chat
template, i.e. exactly what ``loom serve --model out`` loads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom.devices import resolve_device
from loom.finetune.config import FinetuneConfig
from loom.finetune.dataset import load_examples
from loom.finetune.evaluate import EvalReport, evaluate
from loom.finetune.export import export_adapter, export_model
from loom.finetune.formats import load_records
from loom.finetune.lora import apply_lora, merge_lora, num_trainable
from loom.finetune.template import chat_template_for, check_tokenizer
from loom.finetune.trainer import Trainer
from loom.models.catalogue import resolve_model

log = logging.getLogger(__name__)


def load_model(path: str | Path, device: torch.device, gradient_checkpointing: bool = False):
    """(model in float32 with SDPA attention, tokenizer) from a local HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device), tokenizer


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (transformers 5 renamed gradient -> activation checkpointing)."""
    kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen embeddings (LoRA) without input grads
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def auto_threads() -> int:
    """Cores not already busy (1-minute load average), at least 1: oversubscribed OpenMP threads stall each other."""
    cores = os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _evaluate(model, tokenizer, records: list[dict], cfg: FinetuneConfig, template: str, label: str) -> EvalReport:
    t0 = time.perf_counter()
    report = evaluate(model, tokenizer, records, template=template, max_length=cfg.max_length,
                      batch_size=cfg.eval_batch_size)
    log.info("%s: %s (%.0f s)", label, report.summary(), time.perf_counter() - t0)
    return report


def per_task(records: list[dict], report: EvalReport) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for record, pred in zip(records, report.predictions):
        groups.setdefault(record.get("task", "all"), []).append(pred["correct"])
    return {task: sum(v) / len(v) for task, v in sorted(groups.items())}


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the whole recipe; returns the summary also written to ``output/loom_finetune.json``."""
    torch.set_num_threads(cfg.num_threads or auto_threads())
    log.info("torch threads: %d", torch.get_num_threads())
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model_path = resolve_model(cfg.model)
    model, tokenizer = load_model(model_path, device, cfg.gradient_checkpointing)
    check_tokenizer(tokenizer)
    chat_template = chat_template_for(tokenizer, cfg.template)
    examples, skipped = load_examples(cfg.data, tokenizer, template=cfg.template,
                                      train_on_inputs=cfg.train_on_inputs, max_length=cfg.max_length)
    eval_records = _eval_records(cfg)
    base = _evaluate(model, tokenizer, eval_records, cfg, cfg.template, "base") if eval_records else None
    seed_everything(cfg.seed)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)
    trainable, total = num_trainable(model)
    log.info("training %d of %d parameters on %d examples (%d skipped)", trainable, total, len(examples), skipped)
    result = Trainer(cfg, model, tokenizer, examples).fit()
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
    export_model(model, tokenizer, output, chat_template, summary)
    if eval_records:
        del model
        tuned_model, tuned_tok = load_model(output, device)  # exactly the exported folder, its own chat template
        tuned = _evaluate(tuned_model, tuned_tok, eval_records, cfg, cfg.template, "tuned")
        summary["eval"] = _eval_summary(eval_records, base, tuned)
        (output / "eval.json").write_text(json.dumps({**summary["eval"], "predictions": tuned.predictions[:50]},
                                                     indent=2))
    (output / "loom_finetune.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


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
