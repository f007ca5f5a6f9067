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
    """(decoder body, lm_head) of an HF causal LM, also through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.get_output_embeddings()


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
