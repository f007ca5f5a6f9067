"""Prompt weights and long prompts: exact parses, and embeddings equal to ones computed by hand with the tiny CLIPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.image.engine import text_inputs
from loom.image.prompt_weights import parse_weights
from loom.image.request import ImageRequest
from loom.image.text_encoding import encode_prompts

UP = 1.1


@pytest.mark.parametrize(("text", "expected"), [
    ("a plain prompt", [("a plain prompt", 1.0)]),
    ("a (red:1.3) dress, [blurry]", [("a ", 1.0), ("red", 1.3), (" dress, ", 1.0), ("blurry", 1 / UP)]),
    ("((x)) y", [("x", UP * UP), (" y", 1.0)]),
    ("(a [b] c:2) d", [("a ", 2.0), ("b", 2.0 / UP), (" c", 2.0), (" d", 1.0)]),
    ("(a(b:0.5)c)", [("a", UP), ("b", 0.5 * UP), ("c", UP)]),
    (r"\(not weighted\) \[nor this\]", [("(not weighted) [nor this]", 1.0)]),
    ("(open to the end", [("open to the end", UP)]),
    ("stray) and a: colon", [("stray) and a: colon", 1.0)]),
    ("(x:-0.5)(y:1)z", [("x", -0.5), ("yz", 1.0)]),
    ("[x:1.5]", [("x:1.5", 1 / UP)]),
    ("", [("", 1.0)]),
])
def test_parse_weights(text, expected):
    assert parse_weights(text) == expected


def test_out_of_range_weight_is_a_clear_error():
    with pytest.raises(ValueError, match=r"within ±10"):
        ImageRequest(prompt="a (dress:20)")
    with pytest.raises(ValueError, match="negative_prompt"):
        ImageRequest(prompt="x", negative_prompt="(blurry:-11)")


def chunk(tokenizer, ids: list[int]) -> list[int]:
    """BOS + ids + EOS + padding to 77: one chunk laid out by hand."""
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(ids))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def weighted(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """hidden [1, 77, D]: A1111's weighting by hand — scale each position, then restore the chunk's mean."""
    scaled = hidden * torch.tensor(weights)[None, :, None]
    return scaled * (hidden.mean() / scaled.mean())


LONG = ", ".join(f"a photo number {i} of a cat" for i in range(15))  # > 75 tokens: two chunks


def test_sd_weighted_long_prompt_equals_hand_computed(engine):
    pipe = engine.txt2img
    tok, enc = pipe.tokenizer, pipe.text_encoder
    prompt = LONG + ", (red:1.4) [hat]"
    ids = ids_of(tok, LONG + ", ")
    red, hat = ids_of(tok, "red"), ids_of(tok, "hat")
    assert 75 < len(ids) + 2 <= 150
    ids += red + hat
    weights = [1.0] * (len(ids) - 2) + [1.4, 1 / UP]
    first, second = ids[:75], ids[75:]
    with torch.no_grad():
        h1 = enc(torch.tensor([chunk(tok, first)]))[0]
        h2 = enc(torch.tensor([chunk(tok, second)]))[0]
        h2 = weighted(h2, [1.0] + weights[75:] + [1.0] * (76 - len(second)))
        empty = enc(torch.tensor([chunk(tok, [])]))[0]
    kwargs = encode_prompts(pipe, [prompt], [""])
    torch.testing.assert_close(kwargs["prompt_embeds"], torch.cat([h1, h2], 1), rtol=1e-6, atol=1e-6)
    # the negative is padded to the same two chunks with the empty prompt's chunk
    torch.testing.assert_close(kwargs["negative_prompt_embeds"], torch.cat([empty, empty], 1), rtol=0, atol=0)


@pytest.fixture(scope="module")
def xl_pipe():
    from loom.image.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


def test_sdxl_weighted_long_prompt_equals_hand_computed(xl_pipe):
    tok = xl_pipe.tokenizer
    prompt = "(a cat:1.2), " + LONG
    cat, rest = ids_of(tok, "a cat"), ids_of(tok, ", " + LONG)
    ids = cat + rest
    weights = [1.2] * len(cat) + [1.0] * len(rest)
    chunks = [chunk(tok, ids[:75]), chunk(tok, ids[75:])]
    chunk_weights = [[1.0] + weights[:75] + [1.0], [1.0] + weights[75:] + [1.0] * (76 - len(ids[75:]))]
    parts = []
    with torch.no_grad():
        for enc in (xl_pipe.text_encoder, xl_pipe.text_encoder_2):
            hidden = [enc(torch.tensor([c]), output_hidden_states=True).hidden_states[-2] for c in chunks]
            parts.append(torch.cat([weighted(h, w) for h, w in zip(hidden, chunk_weights)], 1))
        pooled = xl_pipe.text_encoder_2(torch.tensor([chunks[0]])).text_embeds
    kwargs = encode_prompts(xl_pipe, [prompt], ["ugly"])
    torch.testing.assert_close(kwargs["prompt_embeds"], torch.cat(parts, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kwargs["pooled_prompt_embeds"], pooled, rtol=1e-6, atol=1e-6)
    assert kwargs["negative_prompt_embeds"].shape == (1, 154, 64)
    # no negative prompt: the pipeline zeroes the unconditional input itself, as for text prompts
    assert "negative_prompt_embeds" not in encode_prompts(xl_pipe, [prompt], [""])


@pytest.mark.parametrize("xl", [False, True])
def test_short_unweighted_prompts_encode_exactly_as_diffusers(engine, xl_pipe, xl):
    pipe = xl_pipe if xl else engine.txt2img
    prompts, negatives = ["a photo of a cat", "an ankle boot"], ["blurry", ""]
    ours = encode_prompts(pipe, prompts, negatives)
    theirs = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=negatives)
    names = (["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
             if xl else ["prompt_embeds", "negative_prompt_embeds"])
    for name, tensor in zip(names, theirs):
        assert torch.equal(ours[name], tensor), name
    assert text_inputs(pipe, prompts, negatives) == {"prompt": prompts, "negative_prompt": negatives}


def test_engine_feeds_the_weighted_embeddings_to_the_pipeline(engine):
    """A weighted prompt's image is the pipeline's image for the hand-checked embeddings; weights change it."""
    req = dict(seed=4, steps=2, width=32, height=32, guidance=5.0, sampler="Euler")
    weighted_image = engine.generate(ImageRequest(prompt="a (red:1.5) dress", **req)).images[0]
    plain_image = engine.generate(ImageRequest(prompt="a red dress", **req)).images[0]
    embeds = encode_prompts(engine.txt2img, ["a (red:1.5) dress"], [""])
    direct = engine.txt2img(**embeds, num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                            generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(np.asarray(weighted_image), np.asarray(direct))
    assert not np.array_equal(np.asarray(weighted_image), np.asarray(plain_image))
