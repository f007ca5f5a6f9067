"""Structured outputs after a thinking block (``reasoning_parser``, vLLM's rule): the gate's states read from the
prompt, the masks it lets through (nothing inside the block; the start tag beside the grammar on a qwen3 output's
first token; the grammar after the end tag), and the engine end to end on a tiny model whose tokenizer has the tags."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from loom import LLM, SamplingParams
from loom.engine.reasoning import ReasoningGate, ThinkTokens, think_tokens
from loom.engine.structured import StructuredOutputs, StructuredOutputsParams

START, END = 49152, 49153
VOCAB = 49216


@pytest.fixture(scope="module")
def tokenizer(tiny_thinker):
    return AutoTokenizer.from_pretrained(str(tiny_thinker))


def structured(tokenizer, parser: str | None) -> StructuredOutputs:
    return StructuredOutputs(tokenizer, VOCAB, [tokenizer.eos_token_id], think=think_tokens(tokenizer, parser))


def allowed(so: StructuredOutputs, matchers: list) -> list[set[int]]:
    """The tokens left finite in each row after ``apply`` on zero logits."""
    logits = torch.zeros(len(matchers), VOCAB)
    so.apply(logits, list(range(len(matchers))), matchers)
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def test_tags_must_be_single_tokens(tokenizer, smollm2_path):
    assert think_tokens(tokenizer, "qwen3") == ThinkTokens(START, END, start_in_output=True)
    assert think_tokens(tokenizer, "deepseek_r1") == ThinkTokens(START, END, start_in_output=False)
    assert think_tokens(AutoTokenizer.from_pretrained(str(smollm2_path)), "qwen3") is None  # "<think>" is 3 tokens
    assert think_tokens(tokenizer, None) is None


def test_the_prompts_last_tag_decides_where_the_output_starts(tokenizer):
    so = structured(tokenizer, "qwen3")
    params = StructuredOutputsParams(choice=["42"])
    assert not isinstance(so.new_matcher(params, [5, START, 7, END, 9]), ReasoningGate)  # the block is closed
    assert so.new_matcher(params, [5, END, START, 7]).state == "open"  # the template opened it
    assert so.new_matcher(params, [5, 7]).state == "may_open"  # qwen3: the output may open it
    assert structured(tokenizer, "deepseek_r1").new_matcher(params, [5, 7]).state == "open"  # starts inside it
    assert not isinstance(structured(tokenizer, None).new_matcher(params, [5, START]), ReasoningGate)


def test_masks_follow_the_block(tokenizer):
    so, plain_so = structured(tokenizer, "qwen3"), structured(tokenizer, None)
    params = StructuredOutputsParams(choice=["42", "7"])
    plain = plain_so.new_matcher(params)
    grammar_first = allowed(plain_so, [plain])[0]
    assert START not in grammar_first and 0 < len(grammar_first) < 10

    gate, free = so.new_matcher(params, [5]), so.new_matcher(params, [5])
    # the first token: the grammar's or the start tag (a row of a plain grammar beside it is unchanged)
    assert allowed(so, [gate, plain]) == [grammar_first | {START}, grammar_first]
    assert gate.consume_token(START) and gate.state == "open" and not gate.is_stopped()
    assert allowed(so, [gate, plain]) == [set(range(VOCAB)), grammar_first]  # inside the block: nothing masked
    for token in tokenizer.encode("so 4 and 2", add_special_tokens=False):  # the grammar sees none of these
        assert gate.consume_token(token)
    assert gate.consume_token(END) and gate.state == "done"
    assert allowed(so, [gate]) == [grammar_first]
    for token in tokenizer.encode("42", add_special_tokens=False):
        assert gate.consume_token(token)
    assert gate.is_stopped()

    # a first token that is not the start tag is the grammar's: no block any more
    seven = tokenizer.encode("7", add_special_tokens=False)
    assert free.consume_token(seven[0]) and free.state == "done" and free.is_stopped()
    assert not so.new_matcher(params, [5]).consume_token(tokenizer.encode("x", add_special_tokens=False)[0])


def test_the_engine_constrains_only_after_the_block(tiny_thinker):
    """deepseek_r1, a prompt that opens the block: the end tag (pushed first by logit_bias) is free, the grammar
    shapes what follows; without the parser the grammar shapes the whole output and the tag cannot appear."""
    params = SamplingParams(temperature=0, max_tokens=16, logit_bias={END: 100.0},
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    prompt = {"prompt_token_ids": [1, 2, 3, START]}
    outputs = {}
    for parser in ("deepseek_r1", None):
        llm = LLM(str(tiny_thinker), num_kv_blocks=64, reasoning_parser=parser)
        outputs[parser] = llm.generate([prompt], params)[0].outputs[0]
    gated, whole = outputs["deepseek_r1"], outputs[None]
    assert gated.token_ids[0] == END and gated.text.startswith("</think>")
    assert gated.text.removeprefix("</think>") in ("yes", "no") and gated.finish_reason == "stop"
    assert END not in whole.token_ids and whole.text in ("yes", "no") and whole.finish_reason == "stop"


HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]


@pytest.fixture(scope="module")
def tiny_harmony(tmp_path_factory, smollm2_path):
    """The tiny Llama with harmony's special tokens (gpt-oss' format) added to its tokenizer (49152 on)."""
    from tests.conftest import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("tiny-harmony"), smollm2_path, vocab_size=VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY})
    tokenizer.save_pretrained(path)
    return path


def test_gpt_oss_blocks_end_at_the_final_channels_header_only(tiny_harmony):
    """harmony: the analysis channel's header ends with the same <|message|> token as the final one's; only the
    final one closes the block, in the prompt (an earlier turn's answer) and in the output."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_harmony))
    ids = dict(zip(HARMONY, tokenizer.convert_tokens_to_ids(HARMONY)))

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    think = think_tokens(tokenizer, "gpt_oss")
    assert think == ThinkTokens(ids["<|start|>"], ids["<|message|>"], False, tuple(encode("<|channel|>final")))
    so = structured(tokenizer, "gpt_oss")
    params = StructuredOutputsParams(choice=["42"])
    earlier = encode("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello<|end|>")
    assert so.new_matcher(params, earlier + encode("<|start|>assistant")).state == "open"
    assert not isinstance(so.new_matcher(params, encode("<|start|>assistant<|channel|>final<|message|>")),
                          ReasoningGate)
    gate = so.new_matcher(params, encode("<|start|>assistant"))
    for token in encode("<|channel|>analysis<|message|>4 and 2<|end|><|start|>assistant<|channel|>final"):
        assert gate.consume_token(token) and gate.state == "open"
    assert gate.consume_token(ids["<|message|>"]) and gate.state == "done"
    for token in encode("42"):
        assert gate.consume_token(token)
    assert gate.is_stopped()
    text = "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>42"
    assert think.block_end(encode(text)) == len(encode(text.removesuffix("42")))


def test_the_engine_constrains_a_gpt_oss_answer_from_its_final_channel_on(tiny_harmony):
    """A prompt that has begun the final header: <|message|> (pushed by logit_bias) completes it and the grammar
    shapes what follows; without the parser the grammar shapes the whole output."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_harmony))
    message = tokenizer.convert_tokens_to_ids("<|message|>")
    params = SamplingParams(temperature=0, max_tokens=16, logit_bias={message: 100.0},
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    prompt = {"prompt_token_ids": tokenizer.encode("<|start|>assistant<|channel|>analysis<|message|>hm<|end|>"
                                                   "<|start|>assistant<|channel|>final", add_special_tokens=False)}
    outputs = {}
    for parser in ("gpt_oss", None):
        llm = LLM(str(tiny_harmony), num_kv_blocks=64, reasoning_parser=parser)
        outputs[parser] = llm.generate([prompt], params)[0].outputs[0]
    gated, whole = outputs["gpt_oss"], outputs[None]
    assert gated.token_ids[0] == message
    assert tokenizer.decode(gated.token_ids[1:], skip_special_tokens=True) in ("yes", "no")
    assert message not in whole.token_ids and whole.text in ("yes", "no")
