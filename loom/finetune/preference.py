"""Preference tuning: DPO (sigmoid, IPO, cDPO label smoothing), ORPO and SimPO on chosen/rejected pairs.

    pairs, skipped = encode_pairs(load_records("prefs.jsonl"), tokenizer, template="chat", max_length=512)
    trainer = PreferenceTrainer(cfg, model, tokenizer, pairs)     # cfg.method "dpo", "orpo" or "simpo"
    result = trainer.fit()

A record is ``{"prompt" | "messages", "chosen", "rejected"}`` as TRL takes them: plain text (``"prompt": "2+2?"``,
``"chosen": "4"``) or conversational (``"prompt": [{"role": "user", ...}]``, ``"chosen": [{"role": "assistant",
...}]``), or with no prompt at all, chosen and rejected as whole conversations that share everything but their last
assistant turn. Each side is encoded exactly as ``encode_example`` encodes an SFT record (the model's chat template,
labels -100 on the prompt), and then only the final assistant turn (and its EOS) stays supervised.

A sequence's log-probability is the sum of log p(token) over its supervised tokens. The chosen and rejected sides of
a micro-batch run in ONE forward: padded, as 2B rows; packed, a pair's two sequences side by side in one row with a
block-diagonal mask (rows hold 2 x max_length tokens, so every pair fits). The reference model's log-probabilities
come from the same model with its LoRA adapters switched off (no second copy), or are computed once before training
and cached per pair. Losses, with the log-ratios ``c = log pi(chosen) - log ref(chosen)``, ``r`` likewise:

- dpo/sigmoid: ``-(1 - e) log sigmoid(beta (c - r)) - e log sigmoid(-beta (c - r))`` (``e`` = label smoothing, cDPO);
- dpo/ipo: ``(c - r - 1 / (2 beta))^2`` on length-averaged log-probs (Azar et al.);
- orpo: ``-mean log pi(chosen) - beta log sigmoid(log odds(chosen) - log odds(rejected))`` on length-averaged
  log-probs, with ``odds(p) = p / (1 - p)`` (Hong et al.; no reference model);
- simpo: ``-log sigmoid(beta (mean log pi(chosen) - mean log pi(rejected)) - gamma)`` on length-averaged log-probs
  (Meng et al. 2024, TRL's CPO with loss_type "simpo" and cpo_alpha 0; no reference model).

The step's loss is the mean over its pairs (each micro-batch's summed loss divided by the step's pair count).
Rewards are ``beta c`` and ``beta r``; reward accuracy is the share of pairs with ``beta c > beta r``.

On several ranks (``loom finetune --nproc-per-node N``, DDP or FSDP2) each rank takes its rows of every micro-batch,
as SFT does (``loom.finetune.distributed``): the divisor is the step's pairs over all ranks, so the gradient is the
1-rank one; the reference forward runs through the same wrapped module (``PairLogps``), and the passes over a list
of pairs (the precomputed reference, held-out evaluation) are dealt out by batch and summed over the ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.finetune.collate import Batch, pack_collate, pad_collate
from loom.finetune.config import FinetuneConfig
from loom.finetune.distributed import Ranks, all_sum, all_sum_, micro_steps, rank_scaled
from loom.finetune.formats import DataError, as_messages, load_records, where
from loom.finetune.loss import causal_lm_parts
from loom.finetune.template import IGNORE_INDEX, check_tokenizer, encode_example
from loom.finetune.trainer import StepStats, Trainer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- records -> token ids


def pair_conversations(record: dict) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation): the same prompt, each ending in its own assistant turn."""
    for key in ("chosen", "rejected"):
        if key not in record:
            keys = sorted(k for k in record if not k.startswith("_"))
            raise DataError(f"{where(record)}: a preference record needs 'chosen' and 'rejected' (and 'prompt' or "
                            f"'messages'); got keys {keys}")
    prompt_value = record.get("prompt", record.get("messages"))
    if prompt_value is None:  # implicit prompt: whole conversations sharing everything but the last turn
        chosen = as_messages(record["chosen"], record, "chosen", "assistant")
        rejected = as_messages(record["rejected"], record, "rejected", "assistant")
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where(record)}: without 'prompt', chosen and rejected must be conversations that "
                            "differ only in their last (assistant) turn")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        prompt = as_messages(prompt_value, record, "prompt", "user")
        chosen = as_messages(record["chosen"], record, "chosen", "assistant")
        rejected = as_messages(record["rejected"], record, "rejected", "assistant")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where(record)}: {name} must end with an assistant turn (the response to compare)")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where(record)}: the prompt ends with an assistant turn; end it with the user's turn")
    return prompt + chosen, prompt + rejected


def only_last_turn(labels: list[int]) -> list[int]:
    """Keep the last supervised run of ``labels`` (the final assistant turn and its EOS); -100 everywhere else."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    if end < 0:
        return list(labels)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start : end + 1] + [IGNORE_INDEX] * (len(labels) - end - 1)


def encode_pair(record: dict, tokenizer, *, template: str = "chat", max_length: int | None = None) -> dict:
    """``{"chosen": example, "rejected": example}``, each ``{"input_ids", "labels"}`` as SFT encodes it, with only the
    final assistant turn supervised (earlier assistant turns of a multi-turn prompt are context)."""
    chosen, rejected = pair_conversations(record)
    out = {}
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        example = encode_example({"messages": messages, "_where": where(record)}, tokenizer, template=template,
                                 max_length=max_length)
        out[name] = {"input_ids": example["input_ids"], "labels": only_last_turn(example["labels"])}
    return out


def _supervised(example: dict) -> int:
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def encode_pairs(records: list[dict], tokenizer, *, template: str = "chat",
                 max_length: int | None = None) -> tuple[list[dict], int]:
    """Encode every record; a pair whose chosen or rejected side has no supervised token left is skipped."""
    check_tokenizer(tokenizer)
    pairs, skipped = [], 0
    for record in records:
        pair = encode_pair(record, tokenizer, template=template, max_length=max_length)
        if _supervised(pair["chosen"]) == 0 or _supervised(pair["rejected"]) == 0:
            skipped += 1
            continue
        pairs.append(pair)
    if skipped:
        log.warning("skipped %d of %d preference pairs with a response cut off by truncation to %s tokens; "
                    "raise --max-length or shorten their prompts", skipped, len(records), max_length)
    return pairs, skipped


def load_pairs(path: str, tokenizer, **kwargs) -> tuple[list[dict], int]:
    pairs, skipped = encode_pairs(load_records(path), tokenizer, **kwargs)
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs (skipped {skipped}); check the format and --max-length")
    return pairs, skipped


# ---------------------------------------------------------------- batches of pairs


@dataclass(slots=True)
class PairBatch:
    batch: Batch
    sequence_ids: torch.Tensor
    """[B, T] long: 2k for pair k's chosen tokens, 2k + 1 for its rejected ones, -1 on padding."""
    pair_index: torch.Tensor
    """[P] long: each pair's index in the trainer's list (looks up precomputed reference log-probs)."""
    counted: bool = True
    """False: a rank's stand-in when its share of a micro-batch is empty; it runs forward and backward (DDP and FSDP2
    need every rank in each reduction) and adds nothing."""

    @property
    def num_pairs(self) -> int:
        return int(self.pair_index.numel())

    @property
    def counted_pairs(self) -> int:
        return self.num_pairs if self.counted else 0

    def to(self, device) -> PairBatch:
        return PairBatch(self.batch.to(device), self.sequence_ids.to(device), self.pair_index.to(device), self.counted)


def collate_pairs(pairs: list[dict], index: list[int], pad_id: int, packing: bool, rows: list[list[int]] | None = None,
                  ) -> PairBatch:
    """Pairs ``index`` (positions in ``pairs``) -> one batch. Padded: rows chosen_0, rejected_0, chosen_1, ...
    Packed: ``rows`` lists, per row, positions into ``index`` of the pairs that share it."""
    sides = [[pairs[i]["chosen"], pairs[i]["rejected"]] for i in index]
    if packing:
        rows = rows if rows is not None else [[k] for k in range(len(index))]
        batch = pack_collate([[ex for k in row for ex in sides[k]] for row in rows], pad_id)
        order = [k for row in rows for k in row]
        seqs = [(2 * k + s, len(sides[k][s]["input_ids"])) for k in order for s in (0, 1)]
        sequence_ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        it = iter(seqs)
        for b, row in enumerate(rows):
            start = 0
            for _ in range(2 * len(row)):
                seq, n = next(it)
                sequence_ids[b, start : start + n] = seq
                start += n
    else:
        batch = pad_collate([ex for side in sides for ex in side], pad_id)
        lengths = [len(ex["input_ids"]) for side in sides for ex in side]
        sequence_ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        for row, n in enumerate(lengths):
            sequence_ids[row, :n] = row
    return PairBatch(batch, sequence_ids, torch.tensor(index, dtype=torch.long))


def sequence_logps(model, pb: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs [2P], supervised token counts [2P]); entry 2k is pair k's chosen side, 2k + 1 its rejected.

    NOTE: as in the SFT loss, the LM head runs only on supervised positions ([N, D] gather, not [B, T, V] logits).
    """
    body, head = causal_lm_parts(model)
    batch = pb.batch
    hidden = body(**batch.model_inputs(), use_cache=False).last_hidden_state  # [B, T, D]
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()  # [N, V]
    token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")  # log_softmax gathered at the targets
    seq = pb.sequence_ids[:, 1:][keep]  # the target token's sequence (a packed sequence's first label is -100)
    n = 2 * pb.num_pairs
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    counts = torch.zeros(n, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


class PairLogps(torch.nn.Module):
    """A causal LM with ``sequence_logps`` as its forward: what DDP and FSDP2 wrap (as ``TokenLoss`` for SFT), so
    every forward, the reference's too, passes through the wrapper's hooks. ``reference=True``: with the LoRA
    adapters switched off (DPO's reference; call it under ``torch.no_grad()``, which DDP must see)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, pb: PairBatch, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lm.disable_adapter() if reference else contextlib.nullcontext():
            return sequence_logps(self.lm, pb)


# ---------------------------------------------------------------- losses


@dataclass(slots=True)
class PreferenceOutput:
    losses: torch.Tensor
    """[P] per-pair loss."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ) -> PreferenceOutput:
    """DPO on sequence log-probs (IPO expects them length-averaged: see ``PreferenceTrainer``)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return PreferenceOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def orpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, *, beta: float) -> PreferenceOutput:
    """ORPO on length-averaged log-probs: SFT on the chosen side plus beta x the odds-ratio term."""
    log_odds = (mean_chosen - mean_rejected) - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
    losses = -mean_chosen - beta * F.logsigmoid(log_odds)
    return PreferenceOutput(losses, beta * mean_chosen.detach(), beta * mean_rejected.detach())


def simpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, *, beta: float,
               gamma: float) -> PreferenceOutput:
    """SimPO on length-averaged log-probs: the scaled margin should exceed ``gamma``; rewards are beta x the means."""
    losses = -F.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)
    return PreferenceOutput(losses, beta * mean_chosen.detach(), beta * mean_rejected.detach())


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 (an averaged log-prob of ~0 would give log(0))."""
    return torch.log1p(-torch.exp(x).clamp(max=1 - 1e-7))


# ---------------------------------------------------------------- trainer


class PreferenceTrainer(Trainer):
    """The SFT Trainer's loop (optimizer, schedule, accumulation, checkpoints, resume) over preference pairs."""

    loss_head = PairLogps

    def __init__(self, cfg: FinetuneConfig, model, tokenizer, pairs: list[dict], reporter=None,
                 ranks: Ranks | None = None):
        if not cfg.is_preference:
            raise ValueError(f"PreferenceTrainer runs method 'dpo', 'orpo' or 'simpo', got {cfg.method!r}")
        self.pairs = pairs
        super().__init__(cfg, model, tokenizer, pairs, reporter=reporter, ranks=ranks)
        self.reference_mode = reference_mode(cfg) if cfg.method == "dpo" else None
        if self.reference_mode == "adapters" and not hasattr(model, "disable_adapter"):
            raise ValueError("reference='adapters' needs a LoRA (peft) model; use lora=True or reference='precompute'")
        self.reference: torch.Tensor | None = None  # [num_pairs, 2] precomputed (chosen, rejected) log-probs

    @staticmethod
    def example_length(pair: dict) -> int:
        return len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])

    @property
    def row_tokens(self) -> int:
        return 2 * self.cfg.max_length  # a packed row holds any pair whole

    @staticmethod
    def empty_share(pb: PairBatch) -> PairBatch:
        return dataclasses.replace(pb, counted=False)

    def collate(self, micro: list[list[int]]) -> PairBatch:
        index = [i for row in micro for i in row]
        rows, k = [], 0
        for row in micro:  # each row's pairs as positions into index
            rows.append(list(range(k, k + len(row))))
            k += len(row)
        return collate_pairs(self.pairs, index, self.pad_id, self.cfg.packing, rows)

    def fit(self, stop_at: int | None = None):
        if self.reference_mode == "precompute" and self.reference is None:
            self.reference = self.precompute_reference()  # before resume loads trained weights: the start model
        return super().fit(stop_at)

    @torch.no_grad()
    def precompute_reference(self, pairs: list[dict] | None = None) -> torch.Tensor:
        """[len(pairs), 2] (chosen, rejected) log-probs of the model as it is now: the reference when called before
        training (held-out pairs too: call it for them before ``fit``). On several ranks each computes its batches
        and every rank gets the whole table."""
        pairs = self.pairs if pairs is None else pairs
        out = torch.zeros(len(pairs), 2, dtype=torch.float32)
        for index, pb in self.in_order(pairs):
            with self.autocast:
                sums, _ = self.loss_module(pb)
            if pb.counted:
                out[index] = sums.view(-1, 2).float().cpu()
        return all_sum_(out.to(self.device)).cpu()  # each entry was filled on exactly one rank

    def in_order(self, pairs: list[dict]) -> Iterator[tuple[list[int], PairBatch]]:
        """``pairs`` in padded batches of eval_batch_size, in order, with the model in eval mode meanwhile:
        (the batch's pair indices, the batch). On several ranks, rank r takes batches r, r + R, ... and every rank
        runs as many forwards (a rank with one batch fewer runs a stand-in that is not ``counted``)."""
        was_training = self.model.training
        self.model.eval()
        size, rank, world = self.cfg.eval_batch_size, self.ranks.rank, self.ranks.world_size
        starts = list(range(0, len(pairs), size))
        mine = starts[rank::world]
        try:
            for k in range(-(-len(starts) // world)):
                start = mine[k] if k < len(mine) else 0
                index = list(range(start, min(start + size, len(pairs))))
                pb = collate_pairs(pairs, index, self.pad_id, packing=False).to(self.device)
                yield index, (pb if k < len(mine) else self.empty_share(pb))
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def reference_logps(self, pb: PairBatch, reference: torch.Tensor | None = None) -> torch.Tensor:
        """[2P] reference log-probs in the batch's sequence order (``reference``: precomputed, else the trainer's)."""
        if self.reference_mode == "precompute":
            table = self.reference if reference is None else reference
            return table[pb.pair_index.cpu()].reshape(-1).to(self.device)
        with self.autocast:
            sums, _ = self.loss_module(pb, reference=True)
        return sums.detach()

    def pair_losses(self, pb: PairBatch, reference: torch.Tensor | None = None,
                    ) -> tuple[PreferenceOutput, torch.Tensor, torch.Tensor]:
        """(losses and rewards, policy log-probs [2P], token counts [2P]) for one micro-batch (with grad)."""
        cfg = self.cfg
        # the reference first: DDP must not see another forward between the policy's and its backward
        ref = self.reference_logps(pb, reference) if cfg.method == "dpo" else None
        with self.autocast:
            logps, counts = self.loss_module(pb)
        if cfg.method in ("orpo", "simpo"):
            mean = logps / counts.clamp(min=1)
            out = (orpo_loss(mean[0::2], mean[1::2], beta=cfg.beta) if cfg.method == "orpo" else
                   simpo_loss(mean[0::2], mean[1::2], beta=cfg.beta, gamma=cfg.simpo_gamma))
            return out, logps, counts
        if cfg.dpo_loss == "ipo":  # IPO compares length-averaged log-probs
            logps_used, ref = logps / counts.clamp(min=1), ref / counts.clamp(min=1)
        else:
            logps_used = logps
        out = dpo_loss(logps_used[0::2], logps_used[1::2], ref[0::2], ref[1::2], beta=cfg.beta,
                       loss_type=cfg.dpo_loss, label_smoothing=cfg.label_smoothing)
        return out, logps, counts

    def train_step(self, batches: list[PairBatch]) -> StepStats:
        self.model.train()
        world = self.ranks.world_size
        total_pairs, num_tokens = (int(x) for x in all_sum(
            [sum(pb.counted_pairs for pb in batches), sum(pb.batch.num_tokens for pb in batches if pb.counted)],
            self.device))
        sums = dict.fromkeys(PAIR_METRICS, 0.0)
        supervised = 0
        for pb in micro_steps(self.loss_module, batches):
            out, logps, counts = self.pair_losses(pb)
            summed = out.losses.sum()
            (rank_scaled(summed, world, total_pairs) if pb.counted else summed * 0.0).backward()
            if pb.counted:
                add_pair_metrics(sums, out, logps.detach())
                supervised += int(counts.sum())
        norm = self.optimizer_step()
        *totals, supervised = all_sum([*sums.values(), supervised], self.device)
        metrics = {k: v / total_pairs for k, v in zip(sums, totals)}
        return StepStats(metrics.pop("loss"), int(supervised), num_tokens, norm,
                         extra={**metrics, "pairs": total_pairs})

    @torch.no_grad()
    def evaluate(self, pairs: list[dict], reference: torch.Tensor | None = None) -> dict[str, float]:
        """Held-out pairs: mean loss, rewards, margins, reward accuracy (strict, as in training, and with a tie
        counted 1/2) and how often the policy itself gives the chosen response the higher log-probability.
        With reference="precompute", pass ``precompute_reference(pairs)`` taken before training. On several ranks
        every rank calls it and gets the figures over all the pairs."""
        if self.reference_mode == "precompute" and reference is None:
            raise ValueError("evaluate: with a precomputed reference, pass precompute_reference(pairs) taken before "
                             "training")
        sums = dict.fromkeys((*PAIR_METRICS, "rewards/accuracy_ties_half", "logps/preference_accuracy"), 0.0)
        for _, pb in self.in_order(pairs):
            out, logps, _ = self.pair_losses(pb, reference)
            if not pb.counted:
                continue
            add_pair_metrics(sums, out, logps)
            ties = (out.chosen_rewards == out.rejected_rewards).float()
            sums["rewards/accuracy_ties_half"] += float(((out.chosen_rewards > out.rejected_rewards).float()
                                                         + 0.5 * ties).sum())
            sums["logps/preference_accuracy"] += float((logps[0::2] > logps[1::2]).float().sum())
        totals = all_sum(list(sums.values()), self.device)
        return {k: v / max(len(pairs), 1) for k, v in zip(sums, totals)} | {"pairs": len(pairs)}


def reference_mode(cfg: FinetuneConfig) -> str:
    if cfg.reference != "auto":
        return cfg.reference
    return "adapters" if cfg.lora else "precompute"


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
                "logps/rejected")
"""What ``add_pair_metrics`` adds up, in a fixed order (the ranks sum them as one list)."""


def add_pair_metrics(sums: dict[str, float], out: PreferenceOutput, logps: torch.Tensor) -> None:
    """Add a micro-batch's per-pair sums (divided by the pair count later): TRL's metric names."""
    sums["loss"] += float(out.losses.detach().sum())
    sums["rewards/chosen"] += float(out.chosen_rewards.sum())
    sums["rewards/rejected"] += float(out.rejected_rewards.sum())
    sums["rewards/margins"] += float((out.chosen_rewards - out.rejected_rewards).sum())
    sums["rewards/accuracy"] += float((out.chosen_rewards > out.rejected_rewards).float().sum())
    sums["logps/chosen"] += float(logps[0::2].sum())
    sums["logps/rejected"] += float(logps[1::2].sum())
