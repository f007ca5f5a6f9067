"""Shared fixtures: offline mode, tiny random Llama-family folders, the packaged SmolLM2 folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from loom.models.catalogue import resolve_model

    return resolve_model("smollm2")


def save_tiny_model(path, smollm2_path, arch: str = "llama", **overrides):
    """A tiny random model of the given family with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    common.update(overrides)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    model = model_cls(cfg_cls(**common)).eval()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(smollm2_path)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_path):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_path)
