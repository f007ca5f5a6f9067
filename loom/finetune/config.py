"""``FinetuneConfig``: every knob of a finetuning run in one dataclass that checks itself.

    cfg = FinetuneConfig(model="smollm2", data="train.jsonl", output="out", lora=True, max_steps=100)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from loom.finetune.template import TEMPLATES

REPORT_TARGETS = ("tensorboard", "wandb")


@dataclass(slots=True)
class FinetuneConfig:
    model: str
    """A catalogue name (smollm2) or a local HF folder of a causal LM."""
    data: str
    """Training records: Alpaca JSON/JSONL, OpenAI messages JSONL or ShareGPT JSON/JSONL."""
    output: str
    """Folder for the servable model (and adapter/ and checkpoints/)."""
    method: Literal["sft", "dpo", "orpo", "simpo", "grpo"] = "sft"
    """"sft" (supervised on responses), "dpo" (preference pairs against a reference model), "orpo" (preference
    pairs, odds-ratio loss added to SFT on the chosen response; no reference model), "simpo" (preference pairs,
    length-averaged log-probs with a target margin; no reference model: TRL's CPO with loss_type "simpo") or "grpo"
    (prompts; completions sampled by Loom's engine and scored by reward_funcs: TRL's GRPOTrainer)."""
    beta: float = 0.1
    """DPO: the KL strength (how far the policy may move from the reference); ORPO: the odds-ratio weight (lambda);
    SimPO: the reward scale (the paper's 2.0-2.5)."""
    simpo_gamma: float = 0.5
    """SimPO: the target reward margin gamma (the margin beta x (mean log-prob chosen - rejected) should exceed);
    the paper's gamma / beta of 0.5 with beta 2.0 is gamma 1.0."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO's loss: "sigmoid" (the DPO paper) or "ipo" (squared, on length-averaged log-probs; Azar et al. 2023)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed share of flipped preference labels, in [0, 0.5) (sigmoid loss only)."""
    reference: Literal["auto", "adapters", "precompute"] = "auto"
    """DPO's reference log-probs: "adapters" (the same model with LoRA switched off: no second copy), "precompute"
    (one pass over the pairs before training, cached), "auto" (adapters with --lora, else precompute)."""
    reward_funcs: list[str] | None = None
    """GRPO: reward functions, each a built-in ("exact_match": the completion equals the record's reference / answer
    / solution, or an SFT record's answer; "contains_reference": it appears in the completion; "overlong": DAPO's
    length penalty near max_completion_length; "think_format":
    <think>...</think> then an answer), a reward model's folder (a sequence classifier) or your own
    module:function / file.py:function, called as TRL calls them (repeatable)."""
    reward_weights: list[float] | None = None
    """GRPO: one weight per reward function (default 1 each); the reward is their weighted sum."""
    num_generations: int = 8
    """GRPO: completions sampled per prompt (the group each is compared with)."""
    max_completion_length: int = 256
    """GRPO: tokens per completion at most; prompts longer than max_length minus this are skipped."""
    temperature: float = 1.0
    """GRPO: sampling temperature of the completions (their log-probs are taken at it too)."""
    top_p: float = 1.0
    """GRPO: nucleus sampling of the completions (1: off)."""
    top_k: int = 0
    """GRPO: top-k sampling of the completions (0: off)."""
    grpo_beta: float = 0.0
    """GRPO: the KL coefficient against the start model (TRL's beta; 0, TRL's default, loads no reference; DeepSeek-R1
    used 0.001)."""
    num_iterations: int = 1
    """GRPO: optimizer steps on each generation batch (TRL's mu); above 1 the ratio to the sampling policy moves
    and the clip binds. max_steps counts every one of them."""
    epsilon: float = 0.2
    """GRPO: the clip range below 1 (and above, unless epsilon_high is given)."""
    epsilon_high: float | None = None
    """GRPO: the clip range above 1 (DAPO's clip-higher: 0.28)."""
    grpo_loss: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = "dapo"
    """GRPO: how token losses are averaged: over the step's completion tokens ("dapo", TRL's default), each
    micro-batch's ("bnpo"), each completion's then the completions ("grpo"), or rows x max_completion_length
    ("dr_grpo")."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: advantages are (reward - group mean) divided by the group's std ("group"), the batch's ("batch") or
    nothing ("none", Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """GRPO: completions cut at max_completion_length add nothing to the loss (DAPO)."""
    rollout_kv_cache_gb: float = 1.0
    """GRPO: memory for the rollout engine's paged KV cache (GiB), beside the training model."""
    eval_data: str | None = None
    """Held-out records: loss, perplexity and greedy exact match, base model next to the tuned one (GRPO: the mean
    reward of greedy completions)."""
    template: Literal["chat", "alpaca"] = "chat"
    """"chat" (the model's own chat template, as `loom serve` applies it) or "alpaca"."""
    train_on_inputs: bool = False
    """Supervise the prompt tokens too (prompt masking off)."""
    max_length: int = 512
    """Examples are truncated to this many tokens; packed rows hold at most this many."""
    packing: bool = True
    """Pack examples into rows of max_length tokens (block-diagonal attention); off: pad each batch."""
    packing_strategy: Literal["ff", "ffd"] = "ff"
    """"ff" (first-fit in shuffled order: every row a random mix) or "ffd" (first-fit decreasing: densest rows, but
    rows of similar lengths, often one task: on the demo, 24 steps gave exact match 0.33 with ffd vs 0.47 with ff)."""
    batch_size: int = 8
    """Examples per micro-batch (padded) or rows of max_length tokens per micro-batch (packed); GRPO: prompts per
    micro-batch, each with its num_generations completions."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int | None = None
    """Optimizer steps; None runs `epochs` over the data."""
    epochs: float = 1.0
    """Passes over the data (when max_steps is not given)."""
    lr: float | None = None
    """Peak learning rate; None picks 2e-4 for LoRA and 2e-5 for a full finetune."""
    warmup_steps: int | None = None
    """Linear warm-up steps before the cosine decay; None uses 5% of the steps."""
    min_lr_ratio: float = 0.0
    """Where the cosine decay ends, as a share of the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    lora: bool = False
    """Train LoRA adapters (peft) and export them merged, instead of every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_targets: str = "all-linear"
    """Comma-separated module names (q_proj,v_proj) or "all-linear"."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    bf16: bool = True
    """bf16 autocast, used only on CUDA (these CPUs have no fast bf16)."""
    seed: int = 0
    """Seeds data order, LoRA initialisation and dropout."""
    save_every: int = 0
    """Checkpoint every N steps and after the last one (0: no checkpoints); atomic; `resume` continues from the last."""
    keep_checkpoints: int = 1
    """Newest checkpoints kept."""
    resume: bool = False
    """Continue from the last checkpoint in output (the same config)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    num_threads: int | None = None
    """torch CPU threads; None: the cores the load average leaves free, at least 1."""
    eval_batch_size: int = 16
    """Held-out examples per evaluation batch."""
    max_eval_examples: int | None = None
    """Evaluate on the first N held-out records only."""
    progress: bool = True
    """A progress bar while training."""
    report_to: list[str] | None = None
    """Where step metrics go besides OUTPUT/logs/metrics.jsonl (always written): tensorboard, wandb (repeatable)."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    mc_eval_data: str | None = None
    """Multiple-choice JSONL ({question, choices, answer}) scored by log-likelihood, base model next to the tuned."""
    nproc_per_node: int = 1
    """Training processes (ranks) to start on this node, one per GPU on CUDA; each takes its rows of every
    micro-batch, so a step trains on the same examples as with 1 (under torchrun leave it out: torchrun starts them)."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """With several ranks: "ddp" (a full replica per rank, gradients all-reduced) or "fsdp" (FSDP2: each decoder
    layer's weights, gradients and optimizer state sharded over the ranks, for models that do not fit one device)."""
    dist_timeout: float = 1800.0
    """Seconds a rank waits for the others in a collective before failing (rank 0 evaluates the base model alone
    meanwhile); a rank that crashes stops the others at once, this is for one that hangs."""

    def __post_init__(self):
        if self.packing_strategy not in ("ffd", "ff"):
            raise ValueError(f"packing_strategy must be 'ffd' or 'ff', got {self.packing_strategy!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        for name in ("max_length", "batch_size", "grad_accum", "lora_r", "lora_alpha", "keep_checkpoints",
                     "nproc_per_node", "dist_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive or None (use epochs), got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.dpo_loss != "sigmoid":
            raise ValueError("label_smoothing (cDPO) applies to dpo_loss='sigmoid' only")
        if self.is_preference and self.train_on_inputs:
            raise ValueError("train_on_inputs applies to method 'sft' only: preference methods score the response")
        if self.reference == "adapters" and not self.lora:
            raise ValueError("reference='adapters' needs lora=True (the reference is the model with adapters off)")
        if self.logging_steps <= 0:
            raise ValueError(f"logging_steps must be positive, got {self.logging_steps}")
        for target in self.report_to or []:
            if target not in REPORT_TARGETS:
                raise ValueError(f"report_to takes {', '.join(REPORT_TARGETS)}; got {target!r}")
        if self.method == "grpo":
            self._check_grpo()
        if self.parallelism not in ("ddp", "fsdp"):
            raise ValueError(f"parallelism must be 'ddp' or 'fsdp', got {self.parallelism!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def _check_grpo(self) -> None:
        if not self.reward_funcs:
            raise ValueError("method grpo needs reward_funcs (--reward-funcs exact_match, or module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                             "reward functions")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (a completion is compared with its group), got "
                             f"{self.num_generations}")
        if not 0 < self.max_completion_length < self.max_length:
            raise ValueError(f"max_completion_length must be positive and below max_length ({self.max_length}), got "
                             f"{self.max_completion_length}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (GRPO samples), got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got {self.top_p} and {self.top_k}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(f"epsilon must be in (0, 1) and epsilon_high positive, got {self.epsilon} and "
                             f"{self.epsilon_high}")
        if self.grpo_beta < 0:
            raise ValueError(f"grpo_beta must be >= 0, got {self.grpo_beta}")
        if self.grpo_loss not in ("dapo", "bnpo", "grpo", "dr_grpo"):
            raise ValueError(f"grpo_loss must be dapo, bnpo, grpo or dr_grpo, got {self.grpo_loss!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.rollout_kv_cache_gb <= 0:
            raise ValueError(f"rollout_kv_cache_gb must be positive, got {self.rollout_kv_cache_gb}")
        if self.train_on_inputs:
            raise ValueError("train_on_inputs applies to method 'sft' only: GRPO trains on sampled completions")
        if self.nproc_per_node > 1:
            raise ValueError("method grpo runs on one process (its rollout engine lives beside the model); leave out "
                             "--nproc-per-node")

    @property
    def is_preference(self) -> bool:
        """Trained on chosen/rejected pairs (dpo, orpo, simpo)."""
        return self.method in ("dpo", "orpo", "simpo")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)

    def to_dict(self) -> dict:
        return asdict(self)
