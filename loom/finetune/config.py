"""``FinetuneConfig``: every knob of a finetuning run in one dataclass that checks itself.

    cfg = FinetuneConfig(model="smollm2", data="train.jsonl", output="out", lora=True, max_steps=100)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loom.finetune.template import TEMPLATES


@dataclass(slots=True)
class FinetuneConfig:
    model: str
    """A catalogue name (smollm2) or a local HF folder of a causal LM."""
    data: str
    """Training records: Alpaca JSON/JSONL, OpenAI messages JSONL or ShareGPT JSON/JSONL."""
    output: str
    """Folder for the servable model (and adapter/ and checkpoints/)."""
    eval_data: str | None = None
    """Held-out records: loss, perplexity and greedy exact match, base model next to the tuned one."""
    template: str = "chat"
    """"chat" (the model's own chat template, as `loom serve` applies it) or "alpaca"."""
    train_on_inputs: bool = False
    """Supervise the prompt tokens too (prompt masking off)."""
    max_length: int = 512
    """Examples are truncated to this many tokens; packed rows hold at most this many."""
    packing: bool = True
    packing_strategy: str = "ff"
    """"ff" (first-fit in shuffled order: every row a random mix) or "ffd" (first-fit decreasing: densest rows, but
    rows of similar lengths, often one task: on the demo, 24 steps gave exact match 0.33 with ffd vs 0.47 with ff)."""
    batch_size: int = 8
    """Examples per micro-batch (padded) or rows of max_length tokens per micro-batch (packed)."""
    grad_accum: int = 1
    max_steps: int | None = None
    """Optimizer steps; None runs `epochs` over the data."""
    epochs: float = 1.0
    lr: float | None = None
    """Peak learning rate; None picks 2e-4 for LoRA and 2e-5 for a full finetune."""
    warmup_steps: int | None = None
    """Linear warm-up steps before the cosine decay; None uses 5% of the steps."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    """Comma-separated module names (q_proj,v_proj) or "all-linear"."""
    gradient_checkpointing: bool = False
    bf16: bool = True
    """bf16 autocast, used only on CUDA (these CPUs have no fast bf16)."""
    seed: int = 0
    save_every: int = 0
    """Checkpoint every N steps and after the last one (0: no checkpoints); atomic; `resume` continues from the last."""
    keep_checkpoints: int = 1
    resume: bool = False
    device: str = "auto"
    num_threads: int | None = None
    eval_batch_size: int = 16
    max_eval_examples: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.packing_strategy not in ("ffd", "ff"):
            raise ValueError(f"packing_strategy must be 'ffd' or 'ff', got {self.packing_strategy!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        for name in ("max_length", "batch_size", "grad_accum", "lora_r", "lora_alpha", "keep_checkpoints"):
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
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)

    def to_dict(self) -> dict:
        return asdict(self)
