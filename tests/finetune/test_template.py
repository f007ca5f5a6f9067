"""encode_example on the real SmolLM2 tokenizer and chat template: exact ids, labels and masks."""

from __future__ import annotations

import copy
import logging

import pytest

from loom.finetune.dataset import encode_records
from loom.finetune.template import ALPACA_CHAT_TEMPLATE, IGNORE_INDEX, encode_example, encode_prompt

from .conftest import ALPACA, CHAT


def chat_ids(tokenizer, messages, add_generation_prompt):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_alpaca_record_prompt_masked_response_and_eos_supervised(tokenizer):
    ex = encode_example(ALPACA, tokenizer)
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "Sort these numbers.\n\n3 1 2"}], True)
    response = tokenizer.encode("1 2 3", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert ex["attention_mask"] == [1] * (len(prompt) + len(response))
    assert ex["labels"][-1] == tokenizer.eos_token_id == 2  # EOS is trained on, though it is also the pad token


def test_prompt_equals_what_the_server_renders(tokenizer):
    ids, reference = encode_prompt(ALPACA, tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sort these numbers.\n\n3 1 2"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(ids) == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert reference == "1 2 3"


def test_multi_turn_supervises_only_assistant_turns(tokenizer):
    ex = encode_example(CHAT, tokenizer)
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == full.rstrip("\n")  # the template's trailing newline is not trained
    supervised = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "hello<|im_end|>ciao<|im_end|>"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ex["input_ids"], ex["labels"]))
    # the second prompt (system, user, assistant, user + generation prompt) is masked in full
    second_prompt = chat_ids(tokenizer, CHAT["messages"][:4], True)
    assert ex["input_ids"][: len(second_prompt)] == second_prompt
    assert ex["labels"][len(second_prompt) :] == ex["input_ids"][len(second_prompt) :]


def test_sharegpt_encodes_like_openai(tokenizer):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT["messages"]]}
    assert encode_example(sharegpt, tokenizer) == encode_example(CHAT, tokenizer)


def test_train_on_inputs_supervises_everything(tokenizer):
    ex = encode_example(CHAT, tokenizer, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_alpaca_template(tokenizer):
    ex = encode_example(ALPACA, tokenizer, template="alpaca")
    text = tokenizer.decode(ex["input_ids"])
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSort these numbers.\n\n### Input:\n3 1 2\n\n### Response:\n1 2 3<|im_end|>"
    )
    supervised = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "1 2 3<|im_end|>"
    served = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sort these numbers.\n\n### Input:\n3 1 2"}], chat_template=ALPACA_CHAT_TEMPLATE,
        add_generation_prompt=True, tokenize=False,
    )
    assert text.startswith(served) and text[len(served) :] == "1 2 3<|im_end|>"


def test_truncation_keeps_the_start(tokenizer):
    full = encode_example(CHAT, tokenizer)
    cut = encode_example(CHAT, tokenizer, max_length=10)
    assert cut == {k: v[:10] for k, v in full.items()}


def test_examples_without_supervised_tokens_are_skipped_and_counted(tokenizer, caplog):
    records = [ALPACA, CHAT, ALPACA]
    with caplog.at_level(logging.WARNING):
        examples, skipped = encode_records(records, tokenizer, max_length=8)  # every prompt is longer than 8 tokens
    assert examples == [] and skipped == 3
    assert "skipped 3 of 3 examples with no supervised tokens after truncation to 8" in caplog.text
    examples, skipped = encode_records(records, tokenizer, max_length=None)
    assert len(examples) == 3 and skipped == 0


def test_tokenizer_without_eos_is_an_error(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.eos_token = None
    assert broken.eos_token_id is None
    with pytest.raises(ValueError, match="no EOS token"):
        encode_example(ALPACA, broken)


def test_tokenizer_without_chat_template_needs_alpaca(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="template='alpaca'"):
        encode_example(ALPACA, plain)
    assert encode_example(ALPACA, plain, template="alpaca") == encode_example(ALPACA, tokenizer, template="alpaca")
