"""Export: a servable HF folder (float32 config.json + model.safetensors + tokenizer + chat template).

The folder is what ``loom serve --model DIR``, ``loom chat`` and ``AutoModelForCausalLM.from_pretrained`` load; the
files are written into a temporary folder first and then moved in, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SERVABLE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def export_model(model, tokenizer, output: Path, chat_template: str, summary: dict) -> Path:
    """Save ``model`` (a plain HF causal LM, adapters merged) in float32 with the tokenizer and chat template."""
    output.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    model.config.use_cache = True
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.chat_template = chat_template
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=output))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loom_finetune.json").write_text(json.dumps(summary, indent=2, default=str))
        for item in tmp.iterdir():
            dest = output / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def export_adapter(model, output: Path) -> Path:
    """Save the LoRA adapter alone (adapter_config.json + adapter_model.safetensors) under ``output/adapter``."""
    target = output / "adapter"
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output))
    try:
        model.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
