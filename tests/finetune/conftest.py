"""Fixtures for the finetuning tests: the SmolLM2 tokenizer (from the converted folder) and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and 2 busy-waiting OpenMP threads stall on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from loom.models.catalogue import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture()
def tiny_llama(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A servable-shaped HF folder with a tiny random Llama and the SmolLM2 tokenizer + chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ALPACA = {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
}
