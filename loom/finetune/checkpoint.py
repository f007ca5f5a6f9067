"""Atomic training checkpoints: trainable weights, optimizer, scheduler, step and RNG states.

A checkpoint is written into a hidden temporary folder and renamed into place (``checkpoints/step-000100``), so a
run killed mid-save leaves the previous checkpoint intact; ``latest_checkpoint`` only ever sees complete ones.

The states are full (unsharded) and keyed by parameter name (torch.distributed.checkpoint's ``get_*_state_dict``),
so a checkpoint written by any number of ranks, under DDP or FSDP2, resumes on any other number::

    weights, optim = full_state(model, optimizer)      # every rank calls it (FSDP2 gathers); rank 0 then writes
    save_checkpoint(folder, step, weights, optim, scheduler, cfg.to_dict())
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "step-"


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimizer state), unsharded, on the CPU, keyed by parameter name. Under FSDP2 every rank
    must call it (it gathers the shards) and only rank 0 gets the tensors."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(model, options=FULL)
    return ({n: t.contiguous() for n, t in weights.items() if n in trainable},
            get_optimizer_state_dict(model, optimizer, options=FULL))


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
                    config: dict, keep: int = 1) -> Path:
    """Write ``full_state``'s result, the scheduler and the RNG states as ``folder/step-NNNNNN`` (rank 0 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:06d}-", dir=folder))
    try:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            tmp / "state.pt",
        )
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
        if target.exists():
            _remove(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(folder, keep)
    return target


def _prune(folder: Path, keep: int) -> None:
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
        _remove(old)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that no half-deleted one is ever visible: renamed to a hidden name first (atomic),
    then removed. A run killed inside rmtree left ``step-N`` with trainer.json but no state.pt (a fault run saw it)."""
    doomed = checkpoint.with_name(f".tmp-old-{checkpoint.name}-{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob(f"{PREFIX}*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore everything saved by ``save_checkpoint`` (every rank calls it: FSDP2 keeps its shard of each state);
    returns the step to continue from."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model ({missing[:3]}...); resume with the same config")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain types only: no code runs
    if _keyed_by_index(state["optimizer"]):  # written by one process before states were keyed by name
        optimizer.load_state_dict(state["optimizer"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return json.loads((path / "trainer.json").read_text())["step"]


def _keyed_by_index(optimizer_state: dict) -> bool:
    """``optimizer.state_dict()`` (parameters by index) rather than ``get_optimizer_state_dict`` (by name)."""
    return any(isinstance(i, int) for group in optimizer_state["param_groups"] for i in group["params"])
