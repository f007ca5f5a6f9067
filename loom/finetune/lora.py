"""LoRA through peft: wrap a causal LM with adapters, and merge them back into a plain HF model for export.

    model = apply_lora(model, r=16, alpha=32, dropout=0.0, targets="all-linear")
    merged = merge_lora(model)          # a plain LlamaForCausalLM, adapters folded into the weights
"""

from __future__ import annotations


def apply_lora(model, *, r: int, alpha: int, dropout: float, targets: str, gradient_checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model  # optional: peft comes with the finetune extra

    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )
    if gradient_checkpointing:
        # Frozen embeddings give inputs without grad; checkpointed blocks then need the input to require grad.
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merge_lora(model):
    """Fold the adapters into the base weights and drop the peft wrapper (the result saves as a plain HF folder)."""
    return model.merge_and_unload()


def num_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
