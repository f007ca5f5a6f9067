"""Mistral 3 (Mistral Small 3.1's architecture) and Pixtral 12B's layout (LLaVA on a Pixtral tower): Loom's prompt ids,
greedy ids and logprobs equal HF transformers' on tiny random checkpoints, pictures of several sizes (each its own
grid of tokens, lines closed by [IMG_BREAK] and the last by [IMG_END]), through chunked prefill and the prefix cache.

transformers' PixtralProcessor needs torchvision, so the reference prompt is written here by its rule (``hf_text``)
and its pixels come from the image processor it wraps, aligned to the merged patch as the processor asks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from loom import LLM, SamplingParams
from loom.models.tiny import save_tiny_mistral3
from tests.engine.test_vision import assert_chunks_and_cache, hf_generate, image, loom_greedy


@pytest.fixture(scope="module", params=["mistral3", "pixtral"])
def pixtral(request, tmp_path_factory, smollm2_path):
    kind = request.param
    return save_tiny_mistral3(tmp_path_factory.mktemp(kind), smollm2_path, pixtral=kind == "pixtral")


class HF:
    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.images = PixtralImageProcessorPil.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
        config = self.model.config  # the merged patch, as PixtralProcessor reckons it: 16 on Mistral 3, 8 on Pixtral
        self.patch = config.vision_config.patch_size * getattr(config, "spatial_merge_size", 1)

    def inputs(self, prompt: str, images: list) -> dict:
        """What PixtralProcessor gives: each [IMG] written as rows of [IMG] closed by [IMG_BREAK], the last by
        [IMG_END], for the picture's resized size; the pixels padded to the batch's largest."""
        out = {}
        if images:
            out = dict(self.images(images=images, patch_size={"height": self.patch, "width": self.patch},
                                   return_tensors="pt"))
            pieces = prompt.split("[IMG]")
            text = pieces[0]
            for (height, width), piece in zip(out["image_sizes"].tolist(), pieces[1:]):
                line = "[IMG]" * (width // self.patch) + "[IMG_BREAK]"
                text += (line * (height // self.patch)).removesuffix("[IMG_BREAK]") + "[IMG_END]" + piece
            prompt = text
        return {**out, "input_ids": self.tokenizer(prompt, return_tensors="pt")["input_ids"]}

    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
        return hf_generate(self.model, self.inputs(prompt, images), max_tokens)


PROMPTS = [
    ("[INST][IMG]What is it?[/INST]", [(1, (40, 50))]),
    ("[INST][IMG]and[IMG]compare them[/INST]", [(2, (90, 30)), (3, (20, 20))]),  # one scaled down, one tiny
    ("[INST]Plain text, no picture.[/INST]", []),
    ("Ends on [IMG]", [(4, (20, 120))]),  # the prompt's last token is [IMG_END]
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_greedy_equals_hf(pixtral, backend):
    hf = HF(pixtral)
    llm = LLM(str(pixtral), attention_backend=backend, num_kv_blocks=128, enable_prefix_caching=False)
    for prompt, pictures in PROMPTS:
        images = [image(seed, size) for seed, size in pictures]
        want_ids, want_lp = hf.greedy(prompt, images, 10)
        request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
        out = llm.generate(request, SamplingParams(max_tokens=10, temperature=0, logprobs=0, ignore_eos=True))[0]
        assert out.prompt_token_ids == hf.inputs(prompt, images)["input_ids"][0].tolist(), prompt
        assert out.outputs[0].token_ids == want_ids, prompt
        lp = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, want_ids)]
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)


def test_token_counts_follow_the_resized_picture(pixtral):
    """A picture's tokens equal the rule's for its resized size, on sizes below, at and past the longest side."""
    hf = HF(pixtral)
    tokens = LLM(str(pixtral), num_kv_blocks=16).engine.image_tokens
    before, after = hf.tokenizer.encode("A"), hf.tokenizer.encode("B")
    rng = np.random.RandomState(0)
    for height, width in [(1, 1), (8, 300), (300, 8), (64, 64), (65, 17), *rng.randint(1, 400, (20, 2)).tolist()]:
        ids = hf.inputs("A[IMG]B", [image(0, (height, width))])["input_ids"][0].tolist()
        assert ids == before + tokens.expansion(width, height) + after, (height, width)
        assert tokens.count(width, height) == ids.count(tokens.token_id)


def test_chunked_prefill_prefix_cache_and_chat(pixtral):
    """5-token steps cut through the pictures' lines; the same pictures again are prefix hits with the same answer,
    another first picture is not; chat puts the picture where the template does."""
    hf = HF(pixtral)
    prompt, pictures = PROMPTS[1]
    llm = LLM(str(pixtral), max_num_batched_tokens=5, num_kv_blocks=128, block_size=4)
    assert_chunks_and_cache(llm, hf.greedy, prompt, [image(seed, size) for seed, size in pictures],
                            image(9, (90, 30)), min_hits=12, max_other_hits=4)
    picture = image(7, (50, 70))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    rendered = hf.tokenizer.bos_token + "[INST][IMG]What is this?[/INST]"
    assert out.prompt_token_ids == hf.inputs(rendered, [picture])["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == hf.greedy(rendered, [picture], 6)[0]


def test_feature_layers_and_thin_pictures(tmp_path, smollm2_path):
    """Pixtral 12B's layout with two feature layers (LLaVA's projector takes their concatenation) equals
    transformers; Mistral 3's projector takes one and refuses a list; a picture too thin for any token is a clear
    ValueError."""
    path = save_tiny_mistral3(tmp_path / "pixtral", smollm2_path, pixtral=True, vision_feature_layer=[-2, -1])
    prompt, pictures = PROMPTS[1]
    images = [image(seed, size) for seed, size in pictures]
    llm = LLM(str(path), num_kv_blocks=64)
    assert loom_greedy(llm, prompt, images, 6)[0] == HF(path).greedy(prompt, images, 6)[0]
    with pytest.raises(ValueError, match="too thin"):
        llm.generate({"prompt": "[IMG]", "multi_modal_data": {"image": [image(0, (1, 200))]}})
    mistral3 = save_tiny_mistral3(tmp_path / "mistral3", smollm2_path, vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="one vision_feature_layer"):
        LLM(str(mistral3), num_kv_blocks=16)


def test_expanded_prompts_are_kept_and_checked(pixtral):
    """A prompt expanded already is kept as it is, even where every picture takes one token ([IMG][IMG_END] holds
    one [IMG], as a placeholder does: the server's expansion was expanded again by the engine, one token too many),
    and one whose pictures' lines are not their layout is refused."""
    llm = LLM(str(pixtral), num_kv_blocks=64)
    tokens = llm.engine.image_tokens
    tiny = image(3, (8, 8))  # one token on either layout
    prompt = "[INST][IMG]What?[/INST]"
    placed = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [tiny]}}, SamplingParams(max_tokens=1))
    ids = placed[0].prompt_token_ids
    assert ids.count(tokens.end_id) == 1 and ids.count(tokens.token_id) == 1
    again = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [tiny]}},
                         SamplingParams(max_tokens=1))
    assert again[0].prompt_token_ids == ids
    picture = image(4, (48, 64))  # 3 lines of 4 on Mistral 3, 6 of 8 on Pixtral
    rows, cols = tokens.grid(64, 48)
    good = tokens.expansion(64, 48)
    transposed = ([tokens.token_id] * rows + [tokens.break_id]) * cols
    transposed[-1] = tokens.end_id
    before = llm.tokenizer.encode("[INST]")
    for expanded, ok in ((good, True), (transposed, False)):
        request = {"prompt_token_ids": before + expanded, "multi_modal_data": {"image": [picture]}}
        if ok:
            assert llm.generate(request, SamplingParams(max_tokens=1))[0].prompt_token_ids == before + expanded
        else:
            with pytest.raises(ValueError, match="not the layout"):
                llm.generate(request, SamplingParams(max_tokens=1))


def test_adapter_on_the_language_model_matches_peft(pixtral, tmp_path):
    """A peft LoRA on the language model (the regex keeps the Pixtral tower's q/v projections out), served unmerged
    on a pictured prompt: peft's ids."""
    from peft import LoraConfig, get_peft_model

    from tests.engine.test_vision import assert_adapter_serves_as_peft

    torch.manual_seed(5)
    hf = HF(pixtral)
    targets = r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)"
    peft_model = get_peft_model(hf.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt, picture = PROMPTS[0][0], [image(9, (40, 50))]
    inputs = hf.inputs(prompt, picture)
    with torch.no_grad():
        want = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert_adapter_serves_as_peft(pixtral, tmp_path / "adapter", prompt, picture, want.tolist())
