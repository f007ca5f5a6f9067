"""Structured outputs offline on the real SmolLM2: JSON schema / object, regex, choice, Lark; per-row masking (free
rows unchanged in a mixed batch), finish at grammar completion, n > 1, compile errors and the compile cache."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loom import LLM, SamplingParams
from loom.engine.structured import StructuredOutputError, StructuredOutputsParams

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(value, schema: dict, path: str = "$") -> None:
    """A JSON-schema check of the subset the tests use (jsonschema is not a dependency); AssertionError on failure."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r} is not an integer"
    elif kind == "number":
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{path}: {value!r} is not a number"
    elif kind is not None:
        assert isinstance(value, _TYPES[kind]), f"{path}: {value!r} is not {kind}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{path}: {value} < {schema['minimum']}"
    if "maximum" in schema:
        assert value <= schema["maximum"], f"{path}: {value} > {schema['maximum']}"
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], f"{path}: {value!r} longer than {schema['maxLength']}"
    if "minLength" in schema:
        assert len(value) >= schema["minLength"], f"{path}: {value!r} shorter than {schema['minLength']}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{path}: {value!r} does not match {schema['pattern']}"
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{path}: fewer than minItems"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: more than maxItems"
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing required {key!r}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{path}.{key}")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
        },
        "required": ["city", "tags", "rating"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "owner": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "active": {"type": "boolean"}},
                "required": ["name", "active"],
                "additionalProperties": False,
            },
        },
        "required": ["color", "owner"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", kv_cache_memory_gb=0.25, max_num_batched_tokens=512)


def constrained(max_tokens: int = 80, n: int = 1, **spec) -> SamplingParams:
    spec = StructuredOutputsParams(**spec)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n, structured_outputs=spec)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_json_schema_outputs_parse_and_validate(llm):
    prompts = [ask("Describe a person as JSON."), ask("Describe a city as JSON."), ask("Describe a car as JSON.")]
    outs = llm.chat(prompts, [constrained(json=s) for s in SCHEMAS])
    for out, schema in zip(outs, SCHEMAS):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        validate(json.loads(c.text), schema)
    # A schema given as JSON text is the same spec (a cache hit, not a second compile).
    hits = llm.engine.structured.num_cache_hits
    out = llm.chat(ask("Describe a person as JSON."), constrained(json=json.dumps(PERSON)))[0].outputs[0]
    validate(json.loads(out.text), PERSON)
    assert llm.engine.structured.num_cache_hits == hits + 1


def test_json_object_regex_choice_and_lark(llm):
    question = ask("Reply with a JSON object with the keys name and age of a person.")
    obj = llm.chat(question, constrained(json_object=True))[0]
    assert obj.outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.outputs[0].text), dict)
    pattern = r"\d{3}-\d{4}"
    reg = llm.generate("My phone number is", constrained(regex=pattern, max_tokens=20))[0].outputs[0]
    assert re.fullmatch(pattern, reg.text) and reg.finish_reason == "stop"
    choices = ["positive", "negative", 'it "depends"']
    ch = llm.generate("Sentiment of 'I love it':", constrained(choice=choices, max_tokens=20))[0].outputs[0]
    assert ch.text in choices and ch.finish_reason == "stop"
    lark = llm.generate("Answer yes or no: is water wet?", constrained(grammar='start: "yes" | "no"'))[0].outputs[0]
    assert lark.text in ("yes", "no") and lark.finish_reason == "stop"


def test_generation_stops_when_the_grammar_completes(llm):
    # Free, the model goes on past "yes"; constrained, the grammar is complete after it, so the output ends there,
    # without waiting for an EOS token.
    prompt = "Q: Is the sky blue? A:"
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0]
    assert len(free.token_ids) > 2
    out = llm.generate(prompt, constrained(choice=[" yes", " no"], max_tokens=30))[0].outputs[0]
    assert out.text in (" yes", " no") and out.finish_reason == "stop"
    assert llm.engine.tokenizer.decode(out.token_ids) == out.text
    assert llm.engine.eos_token_ids.isdisjoint(out.token_ids)


def test_free_rows_are_untouched_in_a_mixed_batch(llm):
    free_prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(free_prompts, free)]
    mixed_before = llm.engine.stats().num_mixed_steps
    prompts = [free_prompts[0], "A person as JSON:", free_prompts[1], "Phone:", free_prompts[2]]
    params = [free, constrained(json=PERSON, max_tokens=40), free, constrained(regex=r"\d{3}-\d{4}"), free]
    outs = llm.generate(prompts, params)
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    validate(json.loads(outs[1].outputs[0].text), PERSON)
    assert re.fullmatch(r"\d{3}-\d{4}", outs[3].outputs[0].text)
    assert llm.engine.stats().num_mixed_steps > mixed_before


def test_n2_siblings_each_follow_the_grammar(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    out = llm.chat(ask("Describe a person as JSON."), params)[0]
    assert len(out.outputs) == 2
    for c in out.outputs:
        assert c.finish_reason == "stop"
        validate(json.loads(c.text), PERSON)


def test_logprobs_are_finite_under_a_small_choice(llm):
    params = constrained(choice=["A", "B"], max_tokens=5).clone(logprobs=5)
    c = llm.generate("Pick A or B:", params)[0].outputs[0]
    assert c.text in ("A", "B")
    assert all(v != float("-inf") for lp in c.logprobs for v in lp.values())


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "frob"}}}}, "frob"),
        ({"regex": "a(("}, "unclosed group"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
        ({"json": "{not json"}, "not valid JSON"),
    ],
)
def test_a_spec_that_does_not_compile_is_a_clear_error(llm, spec, needle):
    with pytest.raises(StructuredOutputError, match=re.escape(needle)):
        llm.generate("x", constrained(**spec))
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished


def test_exactly_one_kind_is_required():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")


@pytest.mark.parametrize("rows, vocab", [([0, 1, 2, 3], 40 * 32), ([1, 3], 40 * 32), ([2], 40 * 32 + 7)])
def test_the_cpu_bitmask_kernel_equals_the_unpacked_reference(rows, vocab):
    """llguidance's packed-bit kernel (the CPU path) forbids exactly what the unpacked bool mask forbids, on the
    constrained rows only, and forbids tokens past the mask's width."""
    from loom.engine.structured import _forbidden, apply_bitmask

    gen = torch.Generator().manual_seed(len(rows) + vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (len(rows), 40), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, vocab, generator=gen)
    expected = logits.clone()
    index = torch.tensor(rows)
    expected[index] = expected[index].masked_fill(_forbidden(mask, vocab), float("-inf"))
    apply_bitmask(logits, rows, mask)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[index]).any() and not torch.isinf(logits[[r for r in range(4) if r not in rows]]).any()


def test_masks_filled_one_by_one_equal_the_thread_pools(llm):
    """Both fill paths (llguidance's pool, and one row after another on the engine thread) forbid the same tokens, for
    matchers in different states (advanced 0, 2, 5 and 9 tokens along allowed ones)."""
    structured = llm.engine.structured
    vocab = llm.engine.model.config.vocab_size
    matchers = []
    for steps in (0, 2, 5, 9):
        matcher = structured.new_matcher(StructuredOutputsParams(json=PERSON))
        for _ in range(steps):
            logits = torch.zeros(1, vocab)
            structured.apply(logits, [0], [matcher])
            allowed = (~torch.isinf(logits[0])).nonzero().flatten()
            assert matcher.consume_token(int(allowed[len(allowed) // 2]))
        matchers.append(matcher)
    results = []
    for parallel in (True, False):
        structured.parallel_fill = parallel
        logits = torch.zeros(len(matchers), vocab)
        structured.apply(logits, list(range(len(matchers))), matchers)
        results.append(torch.isinf(logits))
    structured.parallel_fill = None
    assert torch.equal(results[0], results[1])
    assert len({tuple(row.nonzero().flatten()[:64].tolist()) for row in results[0]}) > 1
