"""Evaluation on held-out records: loss and perplexity on response tokens only, and greedy exact match.

    report = evaluate(model, tokenizer, records, template="chat")
    report.loss, report.perplexity, report.exact_match   # exact match: generated text == reference (stripped)

Exact match generates greedily from the prompt the chat template renders (as ``loom serve`` would) until EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loom.finetune.collate import pad_collate
from loom.finetune.dataset import encode_records
from loom.finetune.loss import token_loss_sum
from loom.finetune.template import encode_prompt


@dataclass(slots=True)
class EvalReport:
    loss: float
    """Mean cross-entropy per response token (prompt tokens are not scored)."""
    num_tokens: int
    exact_match: float
    num_examples: int
    predictions: list[dict] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")

    def summary(self) -> dict:
        return {
            "loss": round(self.loss, 4),
            "perplexity": round(self.perplexity, 3),
            "exact_match": round(self.exact_match, 4),
            "num_examples": self.num_examples,
            "num_response_tokens": self.num_tokens,
        }


@torch.no_grad()
def heldout_loss(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Mean loss per supervised (response) token over ``examples``, and the number of such tokens."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    for i in range(0, len(order), batch_size):
        batch = pad_collate([examples[j] for j in order[i : i + batch_size]], pad_id).to(device)
        summed, n = token_loss_sum(model, batch)
        total, count = total + float(summed), count + n
    return (total / count if count else 0.0), count


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded in batches; decoding stops at EOS."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        width = max(len(prompts[j]) for j in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, j in enumerate(chunk):  # left padding for generation
            ids[row, width - len(prompts[j]) :] = torch.tensor(prompts[j])
            mask[row, width - len(prompts[j]) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
        )
        for row, j in enumerate(chunk):
            texts[j] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return texts


def exact_match(model, tokenizer, records: list[dict], *, template: str = "chat", batch_size: int = 16,
                max_new_tokens: int | None = None) -> tuple[float, list[dict]]:
    """Share of records whose greedy answer equals the reference (whitespace-stripped), with the predictions."""
    encoded = [encode_prompt(r, tokenizer, template=template) for r in records]
    prompts = [ids for ids, _ in encoded]
    refs = [ref for _, ref in encoded]
    budget = max_new_tokens or min(256, max(len(tokenizer.encode(r, add_special_tokens=False)) for r in refs) + 8)
    outputs = greedy_generate(model, tokenizer, prompts, budget, batch_size)
    predictions = [{"reference": r, "prediction": o, "correct": o.strip() == r.strip()} for r, o in zip(refs, outputs)]
    return sum(p["correct"] for p in predictions) / max(1, len(predictions)), predictions


def evaluate(model, tokenizer, records: list[dict], *, template: str = "chat", max_length: int = 512,
             batch_size: int = 16) -> EvalReport:
    examples, _ = encode_records(records, tokenizer, template=template, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss, n = heldout_loss(model, examples, pad_id, batch_size)
    em, predictions = exact_match(model, tokenizer, records, template=template, batch_size=batch_size)
    return EvalReport(loss, n, em, len(records), predictions)
