"""Loading a causal LM for training: float32 with SDPA attention, optional activation checkpointing; thread count.

    model, tokenizer = load_model("path/to/hf-folder", torch.device("cpu"), gradient_checkpointing=False)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


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
