"""Vision-language models (LLaVA): Loom's greedy ids and logprobs equal HF transformers'
``LlavaForConditionalGeneration`` on tiny random checkpoints (CLIP and SigLIP towers), through chunked prefill and
the prefix cache, which must never serve one image's keys and values for another's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from loom import LLM, SamplingParams
from loom.engine.sequence import Sequence
from loom.models.tiny import save_tiny_vision_model
from loom.models.vision import ImageInput, place_image_tokens


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory, smollm2_path):
    return save_tiny_vision_model(tmp_path_factory.mktemp("llava-clip"), smollm2_path, tower="clip")


@pytest.fixture(scope="module")
def siglip_llava(tmp_path_factory, smollm2_path):
    # two feature layers concatenated, Qwen2 as the language model
    return save_tiny_vision_model(tmp_path_factory.mktemp("llava-siglip"), smollm2_path, tower="siglip",
                                  arch="qwen2", vision_feature_layer=[-2, -1])


@pytest.fixture(scope="module")
def granite_llava(tmp_path_factory, smollm2_path):
    # Granite multiplies its whole input, image rows included, by embedding_multiplier (3.0 here)
    return save_tiny_vision_model(tmp_path_factory.mktemp("llava-granite"), smollm2_path, tower="clip",
                                  arch="granite")


@pytest.fixture(scope="module")
def next_llava(tmp_path_factory, smollm2_path):
    return save_tiny_vision_model(tmp_path_factory.mktemp("llava-next"), smollm2_path, anyres=True)


def image(seed: int, size=(40, 50)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


def hf_greedy(path, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
    processor = AutoProcessor.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ids)]
    return ids, logprobs


def hf_generate(model, inputs: dict, max_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy ids after ``inputs`` (the processor's tensors) and each one's logprob."""
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return ids, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ids)]


def loom_greedy(llm: LLM, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    out = llm.generate(request, params)[0].outputs[0]
    return out.token_ids, [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


def assert_greedy_equals(llm: LLM, reference, prompts: list, max_tokens: int = 10) -> None:
    """For each (prompt, [(seed, (height, width)), ...]): Loom's greedy ids equal ``reference(prompt, images,
    max_tokens)``'s and its logprobs are within 2e-4."""
    for prompt, pictures in prompts:
        images = [image(seed, size) for seed, size in pictures]
        want_ids, want_lp = reference(prompt, images, max_tokens)
        ids, lp = loom_greedy(llm, prompt, images, max_tokens)
        assert ids == want_ids, prompt
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)


def assert_chunks_and_cache(llm: LLM, reference, prompt: str, images: list, other_first, min_hits: int,
                            max_other_hits: int) -> None:
    """Through ``llm`` (small steps: chunks cut through the pictures) the answer is ``reference``'s; the same
    pictures again are prefix hits (at least ``min_hits`` tokens) with the same answer; the first picture swapped for
    ``other_first`` hits at most ``max_other_hits`` tokens (the text before it) and answers as ``reference`` does."""
    want = reference(prompt, images, 8)[0]
    assert loom_greedy(llm, prompt, images, 8)[0] == want
    bm = llm.engine.block_manager
    hits = bm.num_prefix_hit_tokens
    assert loom_greedy(llm, prompt, images, 8)[0] == want
    assert bm.num_prefix_hit_tokens - hits >= min_hits
    other = [other_first, *images[1:]]
    hits = bm.num_prefix_hit_tokens
    assert loom_greedy(llm, prompt, other, 8)[0] == reference(prompt, other, 8)[0]
    assert bm.num_prefix_hit_tokens - hits <= max_other_hits


def assert_adapter_serves_as_peft(path, adapter, prompt: str, images: list, want: list[int]) -> None:
    """The peft adapter folder ``adapter``, served unmerged on ``path``, gives ``want`` (peft's ids) for the prompt
    and pictures, and the base model another answer."""
    from loom.engine.lora import LoRARequest

    llm = LLM(str(path), enable_lora=True, max_lora_rank=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=len(want), temperature=0, ignore_eos=True)
    request = {"prompt": prompt, "multi_modal_data": {"image": images}}
    got = llm.generate(request, params, lora_request=LoRARequest("a", 1, str(adapter)))
    assert got[0].outputs[0].token_ids == want
    assert want != llm.generate(request, params)[0].outputs[0].token_ids  # the adapter changes the answer


PROMPTS = [
    ("USER: <image>\nWhat is in the picture? ASSISTANT:", [1]),
    ("USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:", [2, 3]),
    ("Describe this: <image>", [4]),  # the prompt ends on the image: its last token is an image row
]


@pytest.mark.parametrize("tower,backend", [("clip", "auto"), ("clip", "torch"), ("siglip", "auto"),
                                           ("siglip", "torch"), ("granite", "auto")])
def test_greedy_equals_hf(request, tower, backend):
    path = request.getfixturevalue(f"{tower}_llava")
    llm = LLM(str(path), attention_backend=backend, num_kv_blocks=128, enable_prefix_caching=False)
    for prompt, seeds in PROMPTS:
        images = [image(s) for s in seeds]
        want_ids, want_lp = hf_greedy(path, prompt, images, 10)
        ids, lp = loom_greedy(llm, prompt, images, 10)
        assert ids == want_ids, prompt
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)


# (height, width): grids of 1 x 2, 2 x 1, 2 x 2 and 1 x 3 tiles; each unpadded to the picture's aspect
SIZES = [(40, 50), (90, 30), (64, 64), (20, 100), (33, 97)]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_llava_next_anyres_equals_hf(next_llava, backend):
    llm = LLM(str(next_llava), attention_backend=backend, num_kv_blocks=256, enable_prefix_caching=False)
    for i, size in enumerate(SIZES):
        images = [image(i, size)]
        want_ids, want_lp = hf_greedy(next_llava, "USER: <image>\nWhat is this? ASSISTANT:", images, 8)
        ids, lp = loom_greedy(llm, "USER: <image>\nWhat is this? ASSISTANT:", images, 8)
        assert ids == want_ids, size
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)
    # two pictures of different sizes in one prompt, through 7-token chunks
    images = [image(7, SIZES[1]), image(8, SIZES[3])]
    prompt = "USER: <image>\n<image>\nCompare them. ASSISTANT:"
    chunked = LLM(str(next_llava), attention_backend=backend, num_kv_blocks=256, max_num_batched_tokens=7,
                  block_size=4)
    assert loom_greedy(chunked, prompt, images, 8)[0] == hf_greedy(next_llava, prompt, images, 8)[0]


def test_anyres_token_counts_equal_the_processor(next_llava):
    """``ImageTokens.count`` (what the server expands placeholders by) against transformers' processor."""
    processor = AutoProcessor.from_pretrained(str(next_llava))
    llm = LLM(str(next_llava), num_kv_blocks=16)
    tokens = llm.engine.image_tokens
    rng = np.random.RandomState(0)
    for height, width in [*SIZES, *rng.randint(8, 300, size=(40, 2)).tolist()]:
        ids = processor(images=[image(0, (height, width))], text="<image>", return_tensors="pt")["input_ids"][0]
        assert tokens.count(width, height) == int((ids == tokens.token_id).sum()), (height, width)


def test_chunked_prefill_cuts_through_an_image(clip_llava):
    """A 6-token step budget splits each image's 16 rows over chunks."""
    prompt, seeds = PROMPTS[1]
    images = [image(s) for s in seeds]
    llm = LLM(str(clip_llava), max_num_batched_tokens=6, num_kv_blocks=128, block_size=4)
    assert loom_greedy(llm, prompt, images, 8)[0] == hf_greedy(clip_llava, prompt, images, 8)[0]


def test_prefix_cache_tells_images_apart(clip_llava):
    """Two requests whose token ids are equal but whose images differ: the second must not reuse the first's blocks
    past the image (block_size 4: blocks before the image are shared, and that is fine)."""
    prompt = "USER: Look at this picture carefully. <image>\nWhat do you see? ASSISTANT:"
    llm = LLM(str(clip_llava), num_kv_blocks=128, block_size=4)
    bm = llm.engine.block_manager
    first = loom_greedy(llm, prompt, [image(7)], 8)
    hits = bm.num_prefix_hit_tokens
    second = loom_greedy(llm, prompt, [image(8)], 8)
    text_blocks = len(llm.tokenizer.encode("USER: Look at this picture carefully. ")) // 4 * 4
    assert 0 < bm.num_prefix_hit_tokens - hits <= text_blocks  # only the text before the image
    assert second[0] == hf_greedy(clip_llava, prompt, [image(8)], 8)[0]
    assert second[0] != first[0]
    hits = bm.num_prefix_hit_tokens
    again = loom_greedy(llm, prompt, [image(7)], 8)  # the same image again: its blocks are hits
    assert bm.num_prefix_hit_tokens - hits > text_blocks + 16
    assert again[0] == first[0]
    np.testing.assert_allclose(again[1], first[1], atol=1e-4)


def test_chat_places_images_as_the_template_does(clip_llava):
    llm = LLM(str(clip_llava), num_kv_blocks=128)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_pil", "image_pil": image(5)}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    # llava-hf's template writes the turn's images first, then its text
    want = hf_greedy(clip_llava, "USER: <image>\nWhat is this? ASSISTANT:", [image(5)], 6)[0]
    assert out.outputs[0].token_ids == want
    assert out.prompt_token_ids.count(llm.engine.image_tokens.token_id) == 16


def test_refusals(clip_llava, tiny_llama):
    llm = LLM(str(clip_llava), num_kv_blocks=64, limit_mm_per_prompt={"image": 2})
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="2 image tokens for 1 images"):
        llm.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": image(1)}}, params)
    with pytest.raises(ValueError, match="1 image tokens for 0 images"):
        llm.generate("<image> with no image given", params)
    with pytest.raises(ValueError, match="the limit is 2"):
        llm.generate({"prompt": "<image>" * 3, "multi_modal_data": {"image": [image(1)] * 3}}, params)
    with pytest.raises(ValueError, match="PIL images"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": np.zeros((4, 4, 3))}}, params)
    with pytest.raises(ValueError, match="other kinds"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"video": []}}, params)
    assert not llm.engine.has_unfinished_requests()
    text = LLM(str(tiny_llama), num_kv_blocks=64)
    with pytest.raises(ValueError, match="text model"):
        text.generate({"prompt": "hi", "multi_modal_data": {"image": image(1)}}, params)


def test_place_image_tokens():
    assert place_image_tokens([5, 9, 6, 9], 9, [3, 2]) == [5, 9, 9, 9, 6, 9, 9]
    already = [5, 9, 9, 9, 6]
    assert place_image_tokens(already, 9, [3]) is already
    with pytest.raises(ValueError, match="2 image tokens for 1 images"):
        place_image_tokens([9, 1, 9], 9, [3])


def test_image_tokens_hash_as_their_image(clip_llava):
    """The block manager reads a sequence's tokens with each image token replaced by its image's key."""
    seq = Sequence(0, "r", 0, [1, 2, 9, 9, 3], SamplingParams(), 0.0)
    seq.images = ImageInput(np.array([2, 3]), [], {2: -11, 3: -11}, lambda p: torch.zeros(2, 4))
    assert seq.tokens[0:5] == [1, 2, -11, -11, 3]
    assert seq.tokens[3:5] == [-11, 3]
    assert seq.hashed_token_ids == [1, 2, -11, -11, 3]
    assert seq.all_token_ids == [1, 2, 9, 9, 3]


def test_adapter_on_the_language_model_matches_peft(clip_llava, tmp_path):
    """A peft LoRA trained on the whole LLaVA, its targets in the language model (the tower's q/k/v projections are
    named alike, so a regex keeps them out), served unmerged: HF's peft model with the same images gives the same
    ids."""
    from peft import LoraConfig, get_peft_model

    from loom.engine.lora import LoRARequest

    torch.manual_seed(3)
    base = LlavaForConditionalGeneration.from_pretrained(str(clip_llava), dtype=torch.float32)
    targets = r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)"
    # an alpha of its own for one module, named from the language model as peft matches it
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                 alpha_pattern={"language_model.layers.0.self_attn.q_proj": 64}))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt, images = PROMPTS[0][0], [image(9)]
    processor = AutoProcessor.from_pretrained(str(clip_llava))
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    llm = LLM(str(clip_llava), enable_lora=True, max_lora_rank=4, num_kv_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    request = {"prompt": prompt, "multi_modal_data": {"image": images}}
    got = llm.generate(request, params, lora_request=LoRARequest("a", 1, str(tmp_path / "adapter")))
    assert got[0].outputs[0].token_ids == want
    assert want != llm.generate(request, params)[0].outputs[0].token_ids  # the adapter changes the answer


def test_prepared_images_are_checked_and_anyres_needs_a_square_grid(next_llava, tmp_path, smollm2_path):
    """The server hands the engine prepared pixels: one of the wrong shape is a ValueError at admission (not a failed
    step). A LLaVA-NeXT whose tiles are not a square grid of rows (CLS kept) is refused at load, as transformers
    cannot run it either."""
    from loom.models.vision import PreparedImage

    llm = LLM(str(next_llava), num_kv_blocks=64)
    good = llm.engine.vision.images.prepare([image(1, (40, 50))])[0]
    bad = PreparedImage(good.pixels[:1], good.height, good.width, good.key)
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="this model's processor makes"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": bad}}, params)
    direct = llm.generate({"prompt": "<image>", "multi_modal_data": {"image": image(1, (40, 50))}}, params)
    prepared = llm.generate({"prompt": "<image>", "multi_modal_data": {"image": good}}, params)
    assert prepared[0].outputs[0].token_ids == direct[0].outputs[0].token_ids
    full = save_tiny_vision_model(tmp_path / "full", smollm2_path, anyres=True, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="square|grid"):
        LLM(str(full), num_kv_blocks=16)


def test_generate_cli_takes_pictures(clip_llava, tmp_path, capsys):
    import json

    from loom.cli import main

    picture = tmp_path / "cat.png"
    image(12).save(picture)
    assert main(["generate", "--model", str(clip_llava), "--image", str(picture), "--max-tokens", "6",
                 "--ignore-eos", "--num-kv-blocks", "32", "--json", "What is this?"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from PIL import Image

    seen = Image.open(picture).convert("RGB")
    want = hf_greedy(clip_llava, "<image>\nWhat is this?", [seen], 6)[0]
    llm = LLM(str(clip_llava), num_kv_blocks=32)
    assert printed["text"] == llm.tokenizer.decode(want)
    assert main(["generate", "--model", str(clip_llava), "--image", str(tmp_path / "missing.png"), "hi"]) == 2


@pytest.fixture(scope="module", params=["clip", "siglip"])
def onevision_llava(request, tmp_path_factory, smollm2_path):
    return save_tiny_vision_model(tmp_path_factory.mktemp(f"llava-ov-{request.param}"), smollm2_path,
                                  tower=request.param, onevision=True)


def hf_onevision_greedy(path, prompt: str, images: list, tokens, max_tokens: int):
    """transformers' LlavaOnevisionForConditionalGeneration on the prompt with each placeholder expanded by
    ``tokens.count`` (its processor needs torchvision for videos; the model itself refuses a count that does not
    match its features, so this checks the counts too)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

    ids = AutoTokenizer.from_pretrained(str(path))(prompt)["input_ids"]
    ids = place_image_tokens(ids, tokens.token_id, [tokens.count(i.width, i.height, len(images)) for i in images])
    # several pictures of one sample go as a nested batch: the processor pads each to a square, one tile
    pixels = AutoImageProcessor.from_pretrained(str(path))([images] if len(images) > 1 else images, return_tensors="pt")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                         batch_num_images=torch.tensor([len(images)]), max_new_tokens=max_tokens, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    return new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]


def test_llava_onevision_equals_hf(onevision_llava):
    """OneVision: AnyRes grids scaled down past anyres_max_N (N = 1 here, so every grid is), and a prompt of two
    pictures giving each its base view and one newline row."""
    llm = LLM(str(onevision_llava), num_kv_blocks=256, enable_prefix_caching=False)
    tokens = llm.engine.image_tokens
    scaled = 0
    for prompt, images in [("USER: <image>\nWhat? ASSISTANT:", [image(1, SIZES[0])]),
                           ("USER: <image>\nWhat? ASSISTANT:", [image(2, SIZES[1])]),
                           ("USER: <image>\nWhat? ASSISTANT:", [image(3, SIZES[2])]),
                           ("USER: <image>\n<image>\nBoth? ASSISTANT:", [image(4, SIZES[0]), image(5, SIZES[3])])]:
        want_ids, want_lp = hf_onevision_greedy(onevision_llava, prompt, images, tokens, 8)
        ids, lp = loom_greedy(llm, prompt, images, 8)
        assert ids == want_ids, [i.size for i in images]
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)
        unscaled = dataclasses.replace(tokens, max_patches=None)  # LLaVA-NeXT's rows for the same picture
        width, height = images[0].size
        scaled += len(images) == 1 and tokens.grid_rows(width, height) != unscaled.grid_rows(width, height)
    assert scaled  # the scaling down was exercised
    assert tokens.count(50, 40, 2) == tokens.tile_rows + 1 < tokens.count(50, 40, 1)


def test_onevision_keys_tell_a_picture_alone_from_one_of_several(onevision_llava):
    """Alone, a picture's rows are its whole grid; beside another, its base view: its cache key must differ too."""
    llm = LLM(str(onevision_llava), num_kv_blocks=64)
    vision, tokens = llm.engine.vision, llm.engine.image_tokens
    picture = image(6, SIZES[0])
    alone = vision.image_input([tokens.token_id] * tokens.count(50, 40, 1), [picture])
    pair = vision.image_input([tokens.token_id] * (2 * tokens.count(50, 40, 2)), [picture, picture])
    assert set(alone.keys.values()).isdisjoint(pair.keys.values())


def test_encoder_budget_spreads_a_burst_of_pictures(clip_llava):
    """max_num_encoder_tokens (vLLM's encoder budget): a burst of pictured prompts gets its pictures encoded over
    several steps, a prompt's text before its picture still scheduled; a picture larger than the budget runs alone;
    the answers are those of an unbounded engine."""
    prompts = [{"prompt": f"USER: some words first {i} <image>\nWhat? ASSISTANT:",
                "multi_modal_data": {"image": [image(30 + i)]}} for i in range(4)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    free = LLM(str(clip_llava), num_kv_blocks=128)
    want = [o.outputs[0].token_ids for o in free.generate(prompts, params)]
    for budget, most in ((16, 1), (40, 2), (8, 1)):  # 16 rows a picture: one, two, or one over the budget per step
        llm = LLM(str(clip_llava), num_kv_blocks=128, max_num_encoder_tokens=budget)
        vision, engine = llm.engine.vision, llm.engine
        encoded, encode = [], vision.embed
        vision.embed = lambda images, encode=encode, encoded=encoded: encoded.append(len(images)) or encode(images)
        for p in prompts:
            engine.add_request(str(len(engine.requests)) + p["prompt"][-20:], p["prompt"], params,
                               multi_modal_data=p["multi_modal_data"])
        per_step, outs = [], {}
        while engine.has_unfinished_requests():
            before = len(encoded)
            for out in engine.step():
                outs[out.request_id] = out
            per_step.append(len(encoded) - before)
        assert max(per_step) == most and sum(per_step) == 4, budget
        got = [o.outputs[0].token_ids for o in sorted(outs.values(), key=lambda o: o.request_id)]
        assert got == want, budget


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl", "idefics3"])
def test_encoder_in_bfloat16(tmp_path, smollm2_path, kind):
    """--mm-encoder-dtype bfloat16 on a float32 model: the tower runs in bfloat16, its rows within a few percent of
    float32's, cast to the model's dtype in the step (the prompt's answer comes out; the text model stays float32)."""
    from loom.models.tiny import save_tiny_idefics3, save_tiny_qwen_vl

    save = {"llava": save_tiny_vision_model, "qwen2-vl": save_tiny_qwen_vl, "idefics3": save_tiny_idefics3}[kind]
    path = save(tmp_path / kind, smollm2_path)
    full = LLM(str(path), num_kv_blocks=64)
    half = LLM(str(path), num_kv_blocks=64, mm_encoder_dtype="bfloat16")
    tower = half.engine.vision.tower
    assert next(tower.parameters()).dtype == torch.bfloat16
    assert half.engine.model.embed_tokens.weight.dtype == torch.float32
    pictures = full.engine.vision.images.prepare([image(3, (40, 50))])
    want, got = full.engine.vision.embed(pictures), half.engine.vision.embed(pictures)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert ((got.float() - want).norm() / want.norm()).item() < 0.05
    placeholder = half.tokenizer.convert_ids_to_tokens(half.engine.image_tokens.token_id)
    request = {"prompt": f"Look {placeholder} here", "multi_modal_data": {"image": [image(3, (40, 50))]}}
    out = half.generate(request, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="mm_encoder_dtype"):
        LLM(str(path), mm_encoder_dtype="int8")
