"""GRPO: the policy samples a group of completions per prompt through Loom's own engine, reward functions score them,
and each completion is pushed up or down by its reward against its group's (Shao et al. 2024, DeepSeekMath; the
objective and defaults of TRL's ``GRPOTrainer``).

    prompts, skipped = load_prompts("prompts.jsonl", tokenizer, template="chat", max_prompt_tokens=256)
    rollouts = Rollouts(model_path, cfg, device)              # an LLMEngine on the same weights, in this process
    trainer = GRPOTrainer(cfg, model, tokenizer, prompts, RewardSet(["exact_match"]), rollouts)
    result = trainer.fit()

A record is ``{"prompt": str | [messages], ...fields}`` (TRL's prompt-only format; the other fields go to the reward
functions) or any SFT record (Alpaca, ``messages``, ShareGPT): its last assistant turn is then not trained on but
handed to the rewards as ``reference``. A prompt is rendered with the model's chat template and the generation prompt
(a plain string is the user's turn), exactly as ``loom serve`` renders a chat request.

One optimizer step takes ``batch_size x grad_accum`` prompts and samples ``num_generations`` completions for each in
one call to the engine (``temperature``, ``top_p``, ``top_k``, at most ``max_completion_length`` tokens, a seed per
prompt and step). The engine runs on the policy's current weights: after every optimizer step the trainer writes
them into it in place (``LLMEngine.update_weights``; LoRA adapters merged on the fly, the policy untouched), so no
checkpoint is written or read between steps. With rewards ``r`` (the functions' weighted sum; NaN where all abstain)
a completion's advantage is ``A = (r - mean of its group) / (std + 1e-4)``, the std the group's (``scale_rewards``
"group"), the whole batch's ("batch") or none ("none": Dr. GRPO). Per completion token, with ``ratio = pi / pi_old``
(``pi`` the policy's probability of the sampled token at the sampling temperature)::

    loss_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)

With one optimizer step per generation (``num_iterations=1``, TRL's default) ``pi_old`` is the policy itself
(detached): the ratio is 1, the clip never binds, and the gradient is ``-A grad log pi``. With ``num_iterations`` mu
> 1 each generation batch serves mu optimizer steps, ``pi_old`` is the sampling policy's log-probs (one no-grad
forward when the batch is made), and the clip ([1 - epsilon, 1 + epsilon_high]) binds. The KL term (against the
start model: LoRA switched off, or a frozen copy) is there when ``grpo_beta > 0`` (TRL's default 0 loads no reference
model). The token losses are summed and divided by (``grpo_loss``): the step's completion tokens ("dapo", TRL's
default), each micro-batch's tokens ("bnpo"), each completion's own length, then averaged ("grpo"), or the
micro-batch's rows x ``max_completion_length`` ("dr_grpo").
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loom.finetune.collate import Batch
from loom.finetune.config import FinetuneConfig
from loom.finetune.formats import DataError, as_messages, load_records, to_messages, where
from loom.finetune.lora import is_lora
from loom.finetune.loss import causal_lm_parts
from loom.finetune.rewards import REFERENCE_FIELDS, RewardSet
from loom.finetune.template import IGNORE_INDEX, chat_template_for, check_tokenizer, render
from loom.finetune.trainer import StepStats, Trainer

log = logging.getLogger(__name__)

STD_EPS = 1e-4
"""Added to the std that divides the advantages (TRL's)."""
CLIP_EPS = 0.2
"""The PPO clip range's default (TRL's epsilon); it binds only with num_iterations > 1."""


# ---------------------------------------------------------------- prompts


@dataclass(slots=True)
class Prompt:
    ids: list[int]
    """The rendered prompt's token ids (chat template + generation prompt)."""
    prompt: str | list[dict]
    """As the record gives it, for the reward functions."""
    conversational: bool
    """Completions go to the rewards as ``[{"role": "assistant", "content": text}]`` (else as text)."""
    columns: dict = field(default_factory=dict)
    """The record's other fields (``reference``: an SFT record's answer)."""


def prompt_messages(record: dict) -> tuple[list[dict], str | list[dict], bool, dict]:
    """(messages to render, the prompt as given, conversational?, the other fields) of one record."""
    columns = {k: v for k, v in record.items() if not k.startswith("_")}
    if "prompt" in record:
        value = columns.pop("prompt")
        messages = as_messages(value, record, "prompt", "user")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where(record)}: the prompt ends with an assistant turn; end it with the user's turn")
        return messages, value if isinstance(value, str) else messages, not isinstance(value, str), columns
    if isinstance(record.get("messages"), list) and record["messages"] and isinstance(record["messages"][-1], dict) \
            and record["messages"][-1].get("role") != "assistant":  # a prompt-only chat record
        columns.pop("messages")
        return prompt_messages({"prompt": record["messages"], **columns, "_where": record.get("_where")})
    messages = to_messages(record)
    if messages[-1]["role"] == "assistant" and not any(columns.get(f) is not None for f in REFERENCE_FIELDS):
        columns["reference"] = messages[-1]["content"]  # an SFT record's answer: the reference, not a target
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError(f"{where(record)}: no prompt before the last assistant turn")
    return messages, messages, True, columns


def encode_prompts(records: list[dict], tokenizer, *, template: str = "chat",
                   max_prompt_tokens: int | None = None) -> tuple[list[Prompt], int]:
    """Every record's prompt; one longer than ``max_prompt_tokens`` is skipped (and counted)."""
    check_tokenizer(tokenizer)
    chat_template = chat_template_for(tokenizer, template)
    prompts, skipped = [], 0
    for record in records:
        messages, given, conversational, columns = prompt_messages(record)
        text = render(tokenizer, messages, chat_template, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        prompts.append(Prompt(ids, given, conversational, columns))
    if skipped:
        log.warning("skipped %d of %d prompts longer than %s tokens (max_length - max_completion_length)", skipped,
                    len(records), max_prompt_tokens)
    return prompts, skipped


def load_prompts(path: str, tokenizer, **kwargs) -> tuple[list[Prompt], int]:
    """(prompts, skipped) from a JSON / JSONL file."""
    prompts, skipped = encode_prompts(load_records(path), tokenizer, **kwargs)
    if not prompts:
        raise ValueError(f"{path}: no usable prompts (skipped {skipped}); check the format and --max-length")
    return prompts, skipped


# ---------------------------------------------------------------- rollouts through Loom's engine


@dataclass(slots=True)
class Completion:
    ids: list[int]
    """Sampled token ids, the end-of-sequence token included when it ended the completion."""
    text: str
    truncated: bool
    """Cut at max_completion_length (finish_reason "length")."""


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their HF checkpoint names; a peft model's LoRA deltas added to the base weights
    (what ``merge_and_unload`` would give) without touching the model."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer  # optional: peft comes with the finetune extra

    inner = model.get_base_model()
    merged = {}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.base_layer.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter)
                merged[f"{name}.weight"] = weight
    for name, tensor in inner.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, merged.get(name, tensor)


class Rollouts:
    """An ``LLMEngine`` in this process on the policy's weights: groups of sampled completions per prompt, and greedy
    ones for evaluation."""

    def __init__(self, model_path, cfg: FinetuneConfig, device: torch.device):
        from loom.engine.config import EngineConfig  # local: the engine is needed by GRPO only
        from loom.engine.llm_engine import LLMEngine

        self.cfg = cfg
        rows = cfg.batch_size * cfg.grad_accum * cfg.num_generations
        self.engine = LLMEngine(EngineConfig(
            model=str(model_path), dtype="float32" if device.type == "cpu" else "auto", device=str(device),
            max_model_len=cfg.max_length, kv_cache_memory_gb=cfg.rollout_kv_cache_gb, max_num_seqs=min(rows, 256),
            seed=cfg.seed))
        self._calls = 0

    def sync(self, model) -> None:
        """Write the policy's current weights into the engine (in place; its prefix cache emptied)."""
        self.engine.update_weights(policy_weights(model))

    def generate(self, prompts: list[list[int]], n: int, seed: int, greedy: bool = False) -> list[list[Completion]]:
        """``n`` completions for each prompt (one ``SamplingParams`` per prompt, seeded ``seed + i * n``)."""
        from loom.engine.sampling_params import SamplingParams  # local: as in __init__

        cfg = self.cfg
        self._calls += 1
        ids, finished = [], {}
        try:  # a prompt the engine refuses, or a failed step: nothing of this call stays in the engine
            for i, prompt in enumerate(prompts):
                params = SamplingParams(  # the engine seeds sequence k of a request seed + k: n apart, none shared
                    n=n, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                    top_k=0 if greedy else cfg.top_k, max_tokens=cfg.max_completion_length, seed=seed + i * n,
                    output_kind="final_only")
                ids.append(f"rollout-{self._calls}-{i}")
                self.engine.add_request(ids[-1], prompt_token_ids=prompt, params=params)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        finally:
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [[Completion(list(c.token_ids), c.text, c.finish_reason == "length") for c in finished[r].outputs]
                for r in ids]


# ---------------------------------------------------------------- rewards, advantages and the loss


def score_groups(prompts: list[Prompt], rewards: RewardSet, indices: list[int],
                 groups: list[list[Completion]]) -> torch.Tensor:
    """[N, F] rewards of the completions of prompts ``indices``, group after group, as TRL calls reward functions:
    the prompt and each record field repeated once per completion."""
    given, completions, ids, records = [], [], [], []
    for i, group in zip(indices, groups):
        p = prompts[i]
        for c in group:
            given.append(p.prompt)
            completions.append([{"role": "assistant", "content": c.text}] if p.conversational else c.text)
            ids.append(c.ids)
            records.append(p.columns)
    keys = sorted({k for r in records for k in r} - RESERVED)
    return rewards.score(given, completions, ids, {k: [r.get(k) for r in records] for k in keys})


RESERVED = frozenset({"prompts", "completions", "completion_ids"})
"""Record fields that would collide with the reward functions' own arguments: not passed on."""


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased std over the non-NaN entries (TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    return torch.sqrt(torch.nansum((x - mean) ** 2, dim=dim) / (count - 1))


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], the std each was scaled by [N]) for rewards [N] in groups of ``group`` consecutive
    completions of one prompt. NaN rewards (every function abstained) are left out of the means and stds and get
    advantage 0."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:  # "none" keeps the group std for the zero-std count
        std = _nanstd(grouped, dim=1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                    ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = CLIP_EPS,
                    epsilon_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token loss, per-token KL or None): the clipped surrogate on token log-probs [N] with each token's
    completion's advantage [N] (the ratio clipped to [1 - epsilon, 1 + epsilon_high], epsilon_high defaulting to
    epsilon), plus ``beta`` x the k3 estimate of KL(policy || reference)."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None and beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, kl


def clip_active(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float = CLIP_EPS,
                epsilon_high: float | None = None) -> torch.Tensor:
    """[N] bool: tokens whose clipped term is the smaller one, so they send no gradient (TRL's clip_ratio/region)."""
    ratio = torch.exp(logps - old_logps)
    high = 1 + (epsilon if epsilon_high is None else epsilon_high)
    return ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > high) & (advantages > 0))


def reduce_loss(token_loss: torch.Tensor, rows: torch.Tensor, num_rows: int, loss_type: str, *, step_tokens: int,
                num_micro: int, max_completion_length: int) -> torch.Tensor:
    """One micro-batch's share of the step's loss (what ``backward`` takes: summed over micro-batches it is the step's
    loss). ``rows``: each token's completion, 0 .. num_rows - 1."""
    if loss_type == "dapo":
        return token_loss.sum() / max(step_tokens, 1)
    if loss_type == "bnpo":
        return token_loss.sum() / max(token_loss.numel(), 1) / num_micro
    if loss_type == "dr_grpo":
        return token_loss.sum() / (num_rows * max_completion_length) / num_micro
    if loss_type == "grpo":
        sums = torch.zeros(num_rows, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
        counts = torch.zeros(num_rows, dtype=token_loss.dtype, device=token_loss.device).index_add(
            0, rows, torch.ones_like(token_loss))
        return (sums / counts.clamp(min=1)).mean() / num_micro
    raise ValueError(f"grpo_loss must be 'dapo', 'bnpo', 'grpo' or 'dr_grpo', got {loss_type!r}")


@dataclass(slots=True)
class CompletionBatch:
    """A micro-batch's completions laid out for one forward: which hidden state predicts each completion token."""

    batch: Batch
    source: torch.Tensor
    """[N] long: the position (flat over B x T) whose hidden state predicts completion token n."""
    targets: torch.Tensor
    """[N] long: the completion tokens."""
    sequence: torch.Tensor
    """[N] long: each token's completion, 0 .. num_sequences - 1 (the order given)."""
    num_sequences: int

    def to(self, device) -> CompletionBatch:
        return CompletionBatch(self.batch.to(device), self.source.to(device), self.targets.to(device),
                               self.sequence.to(device), self.num_sequences)


def collate_groups(groups: list[tuple[list[int], list[list[int] | None]]], pad_id: int,
                   share_prompt: bool = True, max_row_tokens: int = 512) -> CompletionBatch:
    """``groups``: (prompt ids, its completions' ids; None for one left out of the loss) -> one batch.

    ``share_prompt``: a row holds a prompt ONCE followed by as many of its completions as fit in ``max_row_tokens``
    (at least one), each completion attending to the prompt and causally to itself, its positions continuing the
    prompt's; so a group of G completions runs its prompt through the model once instead of G times, with the same
    log-probabilities and gradients (autograd sums what the completions send back through the shared prompt). Off:
    one right-padded row per completion. Completions left out take no room."""
    rows: list[tuple[list[int], list[tuple[int, list[int]]]]] = []  # (prompt, [(sequence, completion)])
    k = 0
    for prompt, completions in groups:
        row = None
        for ids in completions:
            if ids is not None:
                used = len(prompt) + sum(len(c) for _, c in row[1]) if row is not None else 0
                if row is None or not share_prompt or used + len(ids) > max_row_tokens:
                    row = (prompt, [])
                    rows.append(row)
                row[1].append((k, ids))
            k += 1
    width = max((len(p) + sum(len(c) for _, c in cs) for p, cs in rows), default=1)
    B = max(len(rows), 1)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment = torch.full((B, width), -1, dtype=torch.long)  # 0 the prompt, 1.. its completions, -1 padding
    source, targets, sequence = [], [], []
    for b, (prompt, completions) in enumerate(rows):
        P = len(prompt)
        input_ids[b, :P] = torch.tensor(prompt)
        position_ids[b, :P] = torch.arange(P)
        segment[b, :P] = 0
        start = P
        for s, (seq, ids) in enumerate(completions, start=1):
            n = len(ids)
            input_ids[b, start : start + n] = torch.tensor(ids)
            position_ids[b, start : start + n] = torch.arange(P, P + n)
            segment[b, start : start + n] = s
            # token 0 is predicted from the prompt's last position, token j from the completion's position j - 1
            source += [b * width + P - 1] + [b * width + start + j for j in range(n - 1)]
            targets += ids
            sequence += [seq] * n
            start += n
        position_ids[b, start:] = torch.arange(width - start)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, kv = segment[:, :, None], segment[:, None, :]
    mask = ((q == kv) | ((kv == 0) & (q > 0))) & causal  # padding (-1) is a block of its own: no empty query row
    num_tokens = int((segment >= 0).sum())
    batch = Batch(input_ids, torch.full_like(input_ids, IGNORE_INDEX), mask[:, None], position_ids, num_tokens)
    return CompletionBatch(batch, torch.tensor(source, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                           torch.tensor(sequence, dtype=torch.long), k)


def completion_logps(model, cb: CompletionBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each completion token [N] at ``temperature``, the entropy there [N], detached). The LM head runs
    on the predicting positions only."""
    body, head = causal_lm_parts(model)
    hidden = body(**cb.batch.model_inputs(), use_cache=False).last_hidden_state
    logits = head(hidden.reshape(-1, hidden.shape[-1])[cb.source]).float() / temperature
    token_logps = -F.cross_entropy(logits, cb.targets, reduction="none")
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
    return token_logps, entropy


# ---------------------------------------------------------------- trainer


@dataclass(slots=True)
class Rollout:
    """One generation batch, laid out for the optimizer steps that use it."""

    metrics: dict[str, float]
    tokens: int
    """Completion tokens in the loss (the "dapo" divisor)."""
    num_tokens: int
    """Prompt and completion tokens, every completion counted with its prompt."""
    micro: list[tuple[CompletionBatch, torch.Tensor, int, torch.Tensor | None]] = field(default_factory=list)
    """Per micro-batch: its completions, each token's advantage, how many completions, the sampling policy's
    log-probs (None: one step per generation, the policy's own are used)."""


class GRPOTrainer(Trainer):
    """The SFT Trainer's optimizer, schedule, checkpoints and logging, with rollouts and rewards for data."""

    def __init__(self, cfg: FinetuneConfig, model, tokenizer, prompts: list[Prompt], rewards: RewardSet,
                 rollouts: Rollouts, reporter=None):
        if cfg.method != "grpo":
            raise ValueError(f"GRPOTrainer runs method 'grpo', got {cfg.method!r}")
        self.prompts, self.rewards, self.rollouts = prompts, rewards, rollouts
        super().__init__(cfg, model, tokenizer, prompts, reporter=reporter)
        self.reference = None
        if cfg.grpo_beta > 0 and not is_lora(model):  # LoRA: the model with its adapters off is the reference
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self._stale = cfg.resume  # the engine loaded the start weights; a resumed run trains from others
        self._rollout: Rollout | None = None
        """The generation batch the coming steps train on (``num_iterations`` steps each)."""

    @staticmethod
    def example_length(prompt: Prompt) -> int:
        return len(prompt.ids)

    def _total_steps(self) -> int:
        """An epoch sees every prompt once, and each generation batch takes ``num_iterations`` steps."""
        steps = super()._total_steps()
        return steps if self.cfg.max_steps is not None else steps * self.cfg.num_iterations

    def _plan(self, epoch: int) -> list[list[int]]:
        """Micro-batches of ``batch_size`` prompt indices, in a seeded order per epoch."""
        order = list(range(len(self.prompts)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        size = self.cfg.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def micro_batches(self, skip: int = 0) -> Iterator[list[int]]:
        """Prompt indices (the rollouts make the tensors): each step's ``grad_accum`` micro-batches, handed
        ``num_iterations`` times in a row (``train_step`` samples on the first and reuses the rollouts after)."""
        accum, repeat = self.cfg.grad_accum, self.cfg.num_iterations
        planned, position = self.planned(), 0
        while True:
            step = [next(planned) for _ in range(accum)]
            for _ in range(repeat):
                for micro in step:
                    if position >= skip:
                        yield micro
                    position += 1

    def sample(self, indices: list[int]) -> list[list[Completion]]:
        """``num_generations`` completions of each prompt by the engine, on the policy's current weights."""
        if self._stale:
            self.rollouts.sync(self.model)
            self._stale = False
        generation = self.scheduler.last_epoch // self.cfg.num_iterations  # restored on resume: the same seeds
        seed = (self.cfg.seed * 1_000_003 + (generation + 1) * 100_003) % 2**31
        return self.rollouts.generate([self.prompts[i].ids for i in indices], self.cfg.num_generations, seed)

    def score(self, indices: list[int], groups: list[list[Completion]]) -> torch.Tensor:
        return score_groups(self.prompts, self.rewards, indices, groups)

    def rollout(self, batches: list[list[int]]) -> Rollout:
        """Sample, score and lay out one generation batch: the step's micro-batches of prompts, each with its
        completions' advantages (and, when they are to be reused, the log-probs of the policy that sampled them)."""
        cfg, g = self.cfg, self.cfg.num_generations
        indices = [i for micro in batches for i in micro]
        groups = self.sample(indices)
        table = self.score(indices, groups)
        rewards = self.rewards.combine(table)
        advantages, std = group_advantages(rewards, g, cfg.scale_rewards)
        flat = [c for group in groups for c in group]
        trained = [not (cfg.mask_truncated_completions and c.truncated) for c in flat]
        out = Rollout(metrics=self._rollout_metrics(table, rewards, std, flat),
                      tokens=sum(len(c.ids) for c, t in zip(flat, trained) if t),
                      num_tokens=sum(len(self.prompts[i].ids) + len(c.ids) for i, group in zip(indices, groups)
                                     for c in group))
        first = 0
        for micro in batches:
            count, group0 = g * len(micro), first // g  # this micro-batch's completions and its first group
            rows = [(self.prompts[i].ids, [c.ids if trained[first + j * g + k] else None
                                           for k, c in enumerate(groups[group0 + j])]) for j, i in enumerate(micro)]
            cb = collate_groups(rows, self.pad_id, share_prompt=cfg.packing,
                                max_row_tokens=cfg.max_length).to(self.device)
            adv = advantages[first : first + count].to(self.device)[cb.sequence]
            old = None
            if cfg.num_iterations > 1 and cb.targets.numel():  # the sampling policy's, before this batch's updates
                with torch.no_grad(), self.autocast:
                    old = completion_logps(self.model, cb, cfg.temperature)[0]
            out.micro.append((cb, adv, count, old))
            first += count
        return out

    def train_step(self, batches: list[list[int]]) -> StepStats:
        """One optimizer step: on a new generation batch, or on the last one again (``num_iterations`` > 1; the
        stream hands the same prompts that many times in a row)."""
        cfg = self.cfg
        self.model.train()  # also for the sampling policy's log-probs in rollout(): as the training forward's
        iteration = self.scheduler.last_epoch % cfg.num_iterations  # optimizer steps so far (restored on resume)
        if self._rollout is None or iteration == 0:  # a resumed run samples its block's prompts anew
            self._rollout = self.rollout(batches)
        ro = self._rollout
        metrics = dict(ro.metrics)
        if ro.tokens == 0:  # every completion masked: nothing to learn, no NaN
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return StepStats(0.0, 0, ro.num_tokens, 0.0, extra=metrics)
        loss_sum = kl_sum = entropy_sum = clipped = 0.0
        for cb, adv, count, old in ro.micro:
            if cb.targets.numel() == 0:
                continue
            with self.autocast:
                logps, entropy = completion_logps(self.model, cb, cfg.temperature)
            ref = self._reference_logps(cb) if cfg.grpo_beta > 0 else None
            old = logps.detach() if old is None else old
            token_loss, kl = grpo_token_loss(logps, old, adv, ref_logps=ref, beta=cfg.grpo_beta,
                                             epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high)
            share = reduce_loss(token_loss, cb.sequence, count, cfg.grpo_loss, step_tokens=ro.tokens,
                                num_micro=len(ro.micro), max_completion_length=cfg.max_completion_length)
            share.backward()
            loss_sum += float(share.detach())
            entropy_sum += float(entropy.sum())
            clipped += float(clip_active(logps.detach(), old, adv, cfg.epsilon, cfg.epsilon_high).sum())
            if kl is not None:
                kl_sum += float(kl.detach().sum())
        norm = self.optimizer_step()
        self._stale = True
        metrics.update({"entropy": entropy_sum / ro.tokens, "clip_ratio": clipped / ro.tokens,
                        "iteration": iteration + 1})
        if cfg.grpo_beta > 0:
            metrics["kl"] = kl_sum / ro.tokens
        return StepStats(loss_sum, ro.tokens, ro.num_tokens, norm, extra=metrics)

    @torch.no_grad()
    def _reference_logps(self, cb: CompletionBatch) -> torch.Tensor:
        with self.autocast:
            if self.reference is not None:
                return completion_logps(self.reference, cb, self.cfg.temperature)[0]
            with self.model.disable_adapter():
                return completion_logps(self.model, cb, self.cfg.temperature)[0]

    def _rollout_metrics(self, table: torch.Tensor, rewards: torch.Tensor, std: torch.Tensor,
                         flat: list[Completion]) -> dict[str, float]:
        """TRL's names: the rewards (combined and per function), the share of groups with all-equal rewards, the
        completions' lengths and how many were cut at max_completion_length."""
        lengths = torch.tensor([len(c.ids) for c in flat], dtype=torch.float32)
        ended = [len(c.ids) for c in flat if not c.truncated]
        g = self.cfg.num_generations
        out = {"reward": _nan_float(torch.nanmean(rewards)), "reward_std": _nan_float(_nanstd(rewards)),
               "frac_reward_zero_std": float(torch.isclose(std[::g], torch.zeros(())).float().mean()),
               "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()),
               "completions/clipped_ratio": sum(c.truncated for c in flat) / len(flat),
               "completions/mean_terminated_length": sum(ended) / len(ended) if ended else 0.0,
               "prompts": len(flat) // g}
        for f, name in enumerate(self.rewards.names):
            out[f"rewards/{name}/mean"] = _nan_float(torch.nanmean(table[:, f]))
            out[f"rewards/{name}/std"] = _nan_float(_nanstd(table[:, f]))
        return out


def _nan_float(x: torch.Tensor) -> float:
    value = float(x)
    return 0.0 if math.isnan(value) else value


def reward_eval(rollouts: Rollouts, prompts: list[Prompt], rewards: RewardSet, batch_size: int = 64) -> dict:
    """Greedy completions of held-out prompts by the engine as it is now: the mean reward (combined and per function),
    the mean completion length and how many were cut."""
    tables, flat = [], []
    for start in range(0, len(prompts), batch_size):
        index = list(range(start, min(start + batch_size, len(prompts))))
        groups = rollouts.generate([prompts[i].ids for i in index], 1, seed=0, greedy=True)
        tables.append(score_groups(prompts, rewards, index, groups))
        flat += [c for group in groups for c in group]
    table = torch.cat(tables)
    out = {"reward": _nan_float(torch.nanmean(rewards.combine(table))), "prompts": len(prompts),
           "completions/mean_length": sum(len(c.ids) for c in flat) / max(len(flat), 1),
           "completions/clipped_ratio": sum(c.truncated for c in flat) / max(len(flat), 1)}
    for f, name in enumerate(rewards.names):
        out[f"rewards/{name}"] = _nan_float(torch.nanmean(table[:, f]))
    out["examples"] = [{"prompt": prompts[i].prompt, "completion": c.text, "reward": _nan_float(r)}
                       for i, c, r in zip(range(5), flat, rewards.combine(table))]
    return out
