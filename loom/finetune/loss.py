"""The training loss: summed token cross-entropy over supervised targets, divided by the optimizer step's count.

The trainer sums ``token_loss_sum`` over a step's micro-batches and divides each by the supervised-token count of
the WHOLE step (not a mean of micro-batch means, the transformers bug fixed in PRs #34191/#34198), so gradient
accumulation gives the full-batch gradient. A batch with no supervised token contributes an exact zero, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.finetune.collate import Batch
from loom.finetune.template import IGNORE_INDEX


def causal_lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, LM head) of an HF causal LM, also through a peft wrapper. The head gives the logits the model's
    own forward gives: Granite's ``logits_scaling`` divides them, Cohere's ``logit_scale`` multiplies them, Gemma 2 /
    3's ``final_logit_softcapping`` bends them (by model type: other families use these names otherwise)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    cfg = inner.config
    kind = getattr(cfg, "model_type", "")
    scale = 1.0
    if kind.startswith("granite"):
        scale = 1.0 / (getattr(cfg, "logits_scaling", None) or 1.0)
    elif kind.startswith("cohere"):
        scale = getattr(cfg, "logit_scale", None) or 1.0
    cap = getattr(cfg, "final_logit_softcapping", None) if kind.startswith("gemma") else None
    if scale == 1.0 and not cap:
        return inner.model, head
    return inner.model, ScaledHead(head, scale, cap)


class ScaledHead(torch.nn.Module):
    """``head(x) * scale``, then ``cap * tanh(logits / cap)`` when ``cap``: as the HF model's forward finishes."""

    def __init__(self, head: torch.nn.Module, scale: float, cap: float | None):
        super().__init__()
        self.head, self.scale, self.cap = head, float(scale), cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def token_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised targets, and their number.

    NOTE: logits are computed only at supervised positions (lm_head on a [N, D] gather rather than [B, T, D]); with
    a 49k vocabulary this skips most of the head's FLOPs and the [B, T, V] logits tensor when prompts are masked.
    """
    body, head = causal_lm_parts(model)
    hidden = body(**batch.model_inputs(), use_cache=False).last_hidden_state  # [B, T, D]
    targets = batch.labels[:, 1:]  # [B, T-1]: token t+1 is predicted at position t
    keep = targets != IGNORE_INDEX
    num = int(keep.sum())
    if num == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (and DDP/peft hooks) alive, contributes exactly 0
    logits = head(hidden[:, :-1][keep]).float()  # [N, V]
    return F.cross_entropy(logits, targets[keep], reduction="sum"), num


def reference_loss(model, batch: Batch) -> torch.Tensor:
    """Plain HF path (full logits, mean over supervised targets) used by the tests as the reference."""
    out = model(**batch.model_inputs(), use_cache=False)
    logits = out.logits[:, :-1].float()  # [B, T-1, V]
    return F.cross_entropy(logits.transpose(1, 2), batch.labels[:, 1:], ignore_index=IGNORE_INDEX)
