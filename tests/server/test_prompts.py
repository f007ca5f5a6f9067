"""The routes' prompt encoder gives exactly the ids the tokenizer itself gives, off the event loop, and rejects a
prompt over the context from its count alone."""

from __future__ import annotations

import asyncio

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from loom.entrypoints.openai.prompts import PromptEncoder, PromptTooLong

TEXTS = ["The capital of France is", "  leading spaces, trailing\n\n", "déjà vu 🙂 — ünïcödé 数字 12345",
         "<|im_start|>user\nhi<|im_end|>", "a" * 3000, ""]


@pytest.fixture(scope="module")
def tokenizers(smollm2_path):
    plain = AutoTokenizer.from_pretrained(str(smollm2_path))
    with_bos = AutoTokenizer.from_pretrained(str(smollm2_path))
    bos = with_bos.convert_tokens_to_ids("<|im_start|>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                                   special_tokens=[("<|im_start|>", bos)])
    return [plain, with_bos]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("which", [0, 1], ids=["smollm2", "bos-adding"])
def test_same_ids_as_the_tokenizer(tokenizers, which):
    tok = tokenizers[which]
    encoder = PromptEncoder(tok, max_prompt_chars=10_000)
    try:
        for text in TEXTS:
            for special in (True, False):
                assert run(encoder.encode(text, special)) == tok(text, add_special_tokens=special)["input_ids"], text
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[2]}]
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert run(encoder.chat(messages, True)) == expected
        assert run(encoder.decode(expected)) == tok.decode(expected)
    finally:
        encoder.close()


def test_limits(tokenizers):
    encoder = PromptEncoder(tokenizers[0], max_prompt_chars=100)
    try:
        with pytest.raises(PromptTooLong, match="101 characters"):
            run(encoder.encode("a" * 101))
        with pytest.raises(PromptTooLong, match="tokens but the model's context is 3"):
            run(encoder.encode("one two three four", limit=3))
        assert len(run(encoder.encode("one two three", limit=3))) == 3
    finally:
        encoder.close()


def test_a_prompt_far_past_the_context_is_rejected_from_a_prefix(tokenizers):
    """Only a prefix of a few times the context is tokenized; a prompt just over the limit is counted exactly."""
    tok = tokenizers[0]
    encoder = PromptEncoder(tok, max_prompt_chars=10**7)
    calls = []
    backend = encoder._backend

    class Spy:
        def encode_batch_fast(self, texts, add_special_tokens):
            calls.append(len(texts[0]))
            return backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    encoder._backend = Spy()
    try:
        with pytest.raises(PromptTooLong, match="more than .* tokens .* context is 100"):
            run(encoder.encode("word " * 1_000_000, limit=100))
        assert calls == [max(calls)] and calls[0] < 16 * (100 + 64)
        calls.clear()
        text = "word " * 150  # 151 tokens (the trailing space is one): past 100, within the window: counted whole
        with pytest.raises(PromptTooLong, match="has 151 tokens"):
            run(encoder.encode(text, limit=100))
        assert calls == [len(text)]
        assert run(encoder.encode("word " * 90, limit=100)) == tok("word " * 90)["input_ids"]
    finally:
        encoder.close()
