"""Tiny random Llama-family models saved as HF folders, with a real tokenizer: for tests and fault runs on CPU.

    from loom.models.tiny import save_tiny_model
    save_tiny_model("/tmp/tiny", tokenizer_dir=resolve_model("smollm2"))     # 2 layers, hidden 64, ~3 M params
    loom serve --model /tmp/tiny
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

TINY = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
}
MOE = dict(num_local_experts=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
"""Mixture-of-experts settings the MoE configs take (each ignores the names it does not know)."""
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
"""Gemma's defaults (head_dim 256, window 4096) do not fit a tiny model; a 16-token window takes effect at once."""
SMOLLM3 = dict(no_rope_layer_interval=2)
"""Every second layer without rotary (SmolLM3-3B: every fourth; a 2-layer model would otherwise have none)."""
GRANITE = dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.4, logits_scaling=2.5)
"""Granite's multipliers (the defaults, 1.0, would leave them untested; Granite-3.x-8B: 12, 0.0078125, 0.22, 16)."""


def save_tiny_model(path: str | Path, tokenizer_dir: str | Path, arch: str = "llama", seed: int = 0,
                    **overrides) -> Path:
    """A tiny random model of ``arch`` (one of ARCHS) with the tokenizer (and chat template) of ``tokenizer_dir``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    extra = {"smollm3": SMOLLM3, "granite": GRANITE}.get(arch) or (
        MOE if arch in ("mixtral", "qwen2_moe", "qwen3_moe") else GEMMA if arch.startswith("gemma") else {})
    model_cls(config_cls(**{**TINY, **extra, **overrides})).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return Path(path)
