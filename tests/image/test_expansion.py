"""Prompt expansion through Loom's own LLM engine (the packaged SmolLM2): seeded, word-filtered, recorded."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from loom.image.engine import images_equal
from loom.image.expansion import (
    MAX_PHRASES,
    MIN_PHRASES,
    PromptExpander,
    expansion_words,
    join_expansion,
    phrase_regex,
)
from loom.image.request import ImageRequest

pytestmark = pytest.mark.slow


def added_phrases(prompt: str, expanded: str) -> list[str]:
    assert expanded.startswith(prompt + ", "), expanded
    return [p.strip() for p in expanded[len(prompt) + 2:].split(",")]


def test_regex_accepts_only_listed_phrases():
    regex = re.compile(phrase_regex(["soft lighting", "leather", "soft"]))
    assert regex.fullmatch("soft lighting, leather, soft, leather")
    assert regex.fullmatch("soft, soft lighting, leather, soft lighting")
    assert not regex.fullmatch("soft lighting, leather, soft")  # fewer than MIN_PHRASES
    assert not regex.fullmatch("soft lighting, leather, soft, a dragon")  # a word outside the list
    assert not regex.fullmatch(", ".join(["soft"] * (MAX_PHRASES + 1)))
    assert MIN_PHRASES == 4


def test_join_drops_repeats_prompt_phrases_and_a_cut_tail():
    allowed = {"leather", "soft lighting", "elegant", "boot"}
    reply = "leather, elegant, leather, boot, soft light"  # "soft light": cut by the token limit
    assert join_expansion("an ankle boot, elegant", reply, allowed) == "an ankle boot, elegant, leather, boot"
    assert join_expansion("a boot", "dragon, fire", allowed) == "a boot"


def test_expansion_is_seeded_and_stays_in_the_vocabulary(expander):
    prompts = ["an ankle boot", "a lighthouse at dusk"]
    first = expander.expand(prompts, seeds=[7, 2**31 + 7])
    again = expander.expand(prompts[::-1], seeds=[2**31 + 7, 7])[::-1]  # another batch order, same seeds
    assert first == again
    assert expander.expand(["an ankle boot"], seeds=[7]) == first[:1]
    others = expander.expand(["an ankle boot"] * 3, seeds=[1, 2, 3])
    assert len({first[0], *others}) > 1, "every seed gave the same expansion"
    allowed = set(expansion_words())
    for prompt, text in zip(prompts * 2 + ["an ankle boot"] * 3, first + first + others):
        phrases = added_phrases(prompt, text)
        assert 1 <= len(phrases) <= MAX_PHRASES and len(set(phrases)) == len(phrases)
        assert all(p in allowed for p in phrases), text
    assert expander.expand(["", "  "], seeds=[1, 2]) == ["", "  "]


def test_engine_job_uses_and_records_the_expansion(expanding, expander, tmp_path):
    from loom.image.metadata import read_settings, save_png

    req = ImageRequest(prompt="a sneaker", seed=5, steps=2, num_images=2, expansion=True, styles=["Sharp"])
    result = expanding.generate(req)
    expanded = expander.expand(["a sneaker", "a sneaker"], seeds=[5, 6])
    plain = expanding.generate(ImageRequest(prompt=expanded[0], seed=5, steps=2, styles=["Sharp"]))
    assert result.settings[0]["final_prompt"] == plain.settings[0]["final_prompt"]  # styles wrap the expansion
    assert expanded[0] in result.settings[0]["final_prompt"] and expanded[1] in result.settings[1]["final_prompt"]
    assert images_equal(result.images[0], plain.images[0])  # the model saw exactly the expanded prompt
    assert result.settings[0]["expansion"] is True and result.settings[0]["prompt"] == "a sneaker"
    path = save_png(result.images[1], tmp_path / "1.png", result.settings[1])
    recorded = read_settings(path)
    assert recorded["final_prompt"] == result.settings[1]["final_prompt"] and recorded["expansion"] is True
    again = expanding.generate(ImageRequest.from_settings(recorded))  # the PNG remakes the same expansion
    assert again.settings[0]["final_prompt"] == recorded["final_prompt"]
    assert images_equal(again.images[0], result.images[1], tolerance=2)  # batch of 1 vs 2: float rounding


def test_expansion_without_an_llm_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="--image-expansion-model"):
        engine.generate(ImageRequest(prompt="a sneaker", seed=1, steps=1, expansion=True))


def test_api_revised_prompt_and_400_without_an_llm(engine, expander, tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from loom.image.serve import ImageComponent
    from loom.server.app import build_app

    registry = CollectorRegistry()
    component = ImageComponent(engine.name, registry, tmp_path, engine=engine)
    with TestClient(build_app([component], registry)) as client:
        body = {"prompt": "a dress", "n": 1, "size": "32x32", "seed": 3, "steps": 1, "expansion": True}
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 400 and "--image-expansion-model" in r.json()["detail"]
        engine.expander = expander
        try:
            assert client.get("/v1/images/options").json()["model"]["expansion_model"] == expander.name
            r = client.post("/v1/images/generations", json=body)
        finally:
            engine.expander = None
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] == expander.expand(["a dress"], seeds=[3])[0]


def test_served_llm_expands_as_an_offline_engine_does(smollm2_path, expander):
    """``loom serve --model M --image ...``: the image worker borrows the served engine; same seed, same text."""
    from loom.engine.config import EngineConfig
    from loom.entrypoints.openai.async_engine import AsyncLLMEngine

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    front = AsyncLLMEngine(EngineConfig(model=str(smollm2_path)))
    asyncio.run_coroutine_threadsafe(front.start(), loop).result(120)
    try:
        served = PromptExpander.served(front, loop, "smollm2")
        prompts = ["an ankle boot", "a bag"]
        assert served.expand(prompts, seeds=[11, 12]) == expander.expand(prompts, seeds=[11, 12])
        with pytest.raises(RuntimeError, match="worker thread"):
            asyncio.run_coroutine_threadsafe(_expand_on_loop(served), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(front.shutdown(5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def _expand_on_loop(expander):
    return expander.expand(["a bag"], seeds=[1])
