"""Idefics3 (SmolVLM's architecture): Loom's greedy ids and logprobs equal HF transformers' on a tiny random
checkpoint, with pictures cut into grids of tiles (each placeholder becoming tiles, row/column tags, newlines and the
global view, as the processor writes them), without splitting, through chunked prefill and the prefix cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from loom import LLM, SamplingParams
from loom.models.tiny import save_tiny_idefics3
from tests.engine.test_vision import (
    assert_adapter_serves_as_peft,
    assert_chunks_and_cache,
    assert_greedy_equals,
    hf_generate,
    image,
    loom_greedy,
)


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory, smollm2_path):
    return save_tiny_idefics3(tmp_path_factory.mktemp("idefics3"), smollm2_path)


class HF:
    def __init__(self, path):
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()

    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
        return hf_generate(self.model, self.processor(images=images or None, text=prompt, return_tensors="pt"),
                           max_tokens)


PROMPTS = [
    ("User:<image>What is it?<end_of_utterance>\nAssistant:", [(1, (40, 50))]),  # 2 x 2 tiles
    ("User:<image>and<image>compare them<end_of_utterance>\nAssistant:", [(2, (90, 30)), (3, (20, 20))]),  # 2x1, 2x2
    ("Plain text, no picture.", []),
    ("Ends on <image>", [(4, (20, 120))]),  # 1 x 2: the prompt's last tokens are the global view's
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_greedy_equals_hf(idefics3, backend):
    llm = LLM(str(idefics3), attention_backend=backend, num_kv_blocks=128, enable_prefix_caching=False)
    assert_greedy_equals(llm, HF(idefics3).greedy, PROMPTS)


def test_expansion_equals_the_processors_text(idefics3):
    """``IdeficsImageTokens.expansion`` (what the server puts for a placeholder) against the processor's own ids, on
    grids of every shape the size allows."""
    processor = AutoProcessor.from_pretrained(str(idefics3))
    tokens = LLM(str(idefics3), num_kv_blocks=16).engine.image_tokens
    tokenizer = processor.tokenizer
    before, after = tokenizer.encode("A"), tokenizer.encode("B")
    grids = set()
    rng = np.random.RandomState(0)
    for height, width in [(40, 50), (20, 20), (90, 30), (20, 120), (8, 300), *rng.randint(8, 400, (25, 2)).tolist()]:
        ids = processor(images=[image(0, (height, width))], text="A<image>B")["input_ids"][0]
        assert ids == before + tokens.expansion(width, height) + after, (height, width)
        assert tokens.count(width, height) == ids.count(tokens.token_id)
        grids.add(tokens.grid(width, height))
    assert {(1, 2), (2, 1), (2, 2)} <= grids  # every picture is scaled to 64 a side: never one tile alone


def test_sizes_that_are_not_multiples_of_the_tile(tmp_path, smollm2_path):
    """A longest side (50) that is no multiple of the tile (32): the grid follows the processor's own preprocessing
    (transformers' get_number_of_image_patches reckons otherwise there)."""
    path = save_tiny_idefics3(tmp_path / "fifty", smollm2_path, longest_edge=50)
    processor = AutoProcessor.from_pretrained(str(path))
    tokens = LLM(str(path), num_kv_blocks=16).engine.image_tokens
    before, after = processor.tokenizer.encode("A"), processor.tokenizer.encode("B")
    rng = np.random.RandomState(1)
    for height, width in rng.randint(8, 200, (30, 2)).tolist():
        ids = processor(images=[image(0, (height, width))], text="A<image>B")["input_ids"][0]
        assert ids == before + tokens.expansion(width, height) + after, (height, width)


def test_without_splitting(tmp_path, smollm2_path):
    """do_image_splitting off: every picture is the global view alone (one tile's rows)."""
    path = save_tiny_idefics3(tmp_path / "whole", smollm2_path, split=False)
    llm = LLM(str(path), num_kv_blocks=64)
    prompt, pictures = PROMPTS[0]
    images = [image(seed, size) for seed, size in pictures]
    assert llm.engine.image_tokens.count(50, 40) == 4
    assert loom_greedy(llm, prompt, images, 8)[0] == HF(path).greedy(prompt, images, 8)[0]


def test_chunked_prefill_prefix_cache_and_chat(idefics3):
    """5-token steps cut through the tiles; the same pictures again are prefix hits with the same answer, another
    picture is not; chat puts the picture where the template does."""
    hf = HF(idefics3)
    prompt, pictures = PROMPTS[1]
    llm = LLM(str(idefics3), max_num_batched_tokens=5, num_kv_blocks=128, block_size=4)
    # another first picture: "User:" and the first tile's tags at most
    assert_chunks_and_cache(llm, hf.greedy, prompt, [image(seed, size) for seed, size in pictures],
                            image(9, (90, 30)), min_hits=30, max_other_hits=7)

    picture = image(7, (50, 70))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    rendered = "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    assert out.outputs[0].token_ids == hf.greedy(rendered, [picture], 6)[0]


def test_adapter_on_the_language_model_matches_peft(idefics3, tmp_path):
    """A peft LoRA on SmolVLM's language model (a regex keeps the tower's like-named projections out), served
    unmerged: transformers' peft model on the same picture gives the same ids."""
    from peft import LoraConfig, get_peft_model


    torch.manual_seed(5)
    hf = HF(idefics3)
    targets = r".*text_model.*\.(q_proj|v_proj|gate_proj|down_proj)"
    peft_model = get_peft_model(hf.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt, picture = PROMPTS[0][0], [image(9, (40, 50))]
    inputs = hf.processor(images=picture, text=prompt, return_tensors="pt")
    with torch.no_grad():
        want = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert_adapter_serves_as_peft(idefics3, tmp_path / "adapter", prompt, picture, want.tolist())


def test_smolvlm2_equals_hf(tmp_path, smollm2_path):
    """SmolVLM2 (SmolVLMForConditionalGeneration): the same tiling and prompt as Idefics3, its own modules; checked
    against transformers' model on the prompt its processor's prompt function writes (the processor itself needs
    num2words) and its image processor's tiles."""
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    path = save_tiny_idefics3(tmp_path / "smolvlm2", smollm2_path, smolvlm=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    images = SmolVLMImageProcessorPil.from_pretrained(str(path))
    model = SmolVLMForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()

    def reference(prompt, pictures, max_tokens):
        pixels = images(images=[pictures], return_tensors="pt", return_row_col_info=True)
        for rows, cols in zip(pixels.pop("rows")[0], pixels.pop("cols")[0]):
            prompt = prompt.replace("<image>", get_image_prompt_string(
                rows, cols, 4, "<fake_token_around_image>", "<IMG>", "<global-img>"), 1)
        ids = torch.tensor([tokenizer.encode(prompt.replace("<IMG>", "<image>"))])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, **pixels)
        new = out.sequences[0, ids.shape[1]:].tolist()
        return new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]

    llm = LLM(str(path), num_kv_blocks=128, enable_prefix_caching=False)
    assert_greedy_equals(llm, reference, [p for p in PROMPTS if p[1]])
