"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: Loom's greedy ids and logprobs equal HF transformers' on tiny random
checkpoints, with pictures of several sizes (each its own token count), two in a prompt, a prompt ending on one,
through chunked prefill, the prefix cache and preemption; the M-RoPE positions equal transformers' ``get_rope_index``
and Qwen3-VL's interleaved rotation its rotary embedding's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from loom import LLM, SamplingParams
from loom.models.qwen_vl import mrope_positions
from loom.models.tiny import save_tiny_qwen_vl
from loom.models.vision import place_image_tokens
from loom.ops.rotary import RotaryEmbedding, mrope_columns, mrope_rows
from tests.engine.test_vision import (
    assert_adapter_serves_as_peft,
    assert_chunks_and_cache,
    assert_greedy_equals,
    hf_generate,
    image,
    loom_greedy,
)

V = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module", params=["2", "2.5", "3", "3-moe"])
def qwen_vl(request, tmp_path_factory, smollm2_path):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp(f"qwen{request.param}-vl"), smollm2_path,
                             version=request.param)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory, smollm2_path):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen2-vl"), smollm2_path, version="2")


@pytest.fixture(scope="module", params=["2", "3", "3-moe"])
def qwen2_or_3_vl(request, tmp_path_factory, smollm2_path):
    """Qwen2-VL, then Qwen3-VL (interleaved M-RoPE, DeepStack rows that chunks cut through as they cut the input
    rows) and its MoE."""
    return save_tiny_qwen_vl(tmp_path_factory.mktemp(f"qwen{request.param}-vl-"), smollm2_path,
                             version=request.param)


class HF:
    """transformers' model on a prompt whose ``<|image_pad|>`` placeholders are expanded by the image processor's
    grids (the full processor needs torchvision for videos; the model refuses counts that miss its features)."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
        self.pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def inputs(self, prompt: str, images: list) -> dict:
        ids = self.tokenizer.encode(prompt)
        extra = {}
        if images:
            pixels = self.processor(images=images, return_tensors="pt")
            ids = place_image_tokens(ids, self.pad, (pixels["image_grid_thw"].prod(-1) // 4).tolist())
            extra = dict(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        input_ids = torch.tensor([ids])
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    mm_token_type_ids=(input_ids == self.pad).int(), **extra)

    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
        return hf_generate(self.model, self.inputs(prompt, images), max_tokens)


PROMPTS = [
    (f"Describe: {V} what is it?", [(1, (40, 50))]),
    (f"A {V} and {V}, compare them.", [(2, (90, 30)), (3, (64, 100))]),  # tall, then wide: other grids
    ("Plain text, no picture at all.", []),
    (f"Ends on {V}", [(4, (20, 120))]),  # the prompt's last tokens are an image's
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_greedy_equals_hf(qwen_vl, backend):
    llm = LLM(str(qwen_vl), attention_backend=backend, num_kv_blocks=128, enable_prefix_caching=False)
    assert_greedy_equals(llm, HF(qwen_vl).greedy, PROMPTS)


def test_mrope_positions_equal_transformers(qwen2_or_3_vl):
    """The positions every prompt token rotates by, the image tokens' three, and the delta after the prompt."""
    hf = HF(qwen2_or_3_vl)
    llm = LLM(str(qwen2_or_3_vl), num_kv_blocks=64)
    vision = llm.engine.vision
    deltas = set()
    for prompt, pictures in [*PROMPTS, (f"{V}{V}", [(5, (32, 32)), (6, (100, 20))])]:
        images = [image(seed, size) for seed, size in pictures]
        inputs = hf.inputs(prompt, images)
        want, delta = hf.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    inputs.get("image_grid_thw"))
        ids = inputs["input_ids"][0].tolist()
        if not images:
            assert (want[:, 0].numpy() == np.arange(len(ids))).all() and delta.item() == 0
            continue
        got = vision.image_input(ids, images)
        text = np.ones(len(ids), bool)
        text[got.positions] = False
        np.testing.assert_array_equal(got.rope[text], want[0, 0].numpy()[text])
        np.testing.assert_array_equal(got.mrope, want[:, 0].numpy()[:, got.positions].T)
        np.testing.assert_array_equal(got.rope[~text], want[0, 0].numpy()[~text])
        assert got.rope_delta == delta.item()
        deltas.add(got.rope_delta)
    assert min(deltas) < 0  # a picture of several rows and columns puts positions behind indices


def test_token_counts_equal_the_processor(qwen2_vl):
    """``ImageTokens.count`` (what the server expands a placeholder by) against the processor's grid."""
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(qwen2_vl))
    tokens = LLM(str(qwen2_vl), num_kv_blocks=16).engine.image_tokens
    rng = np.random.RandomState(0)
    counts = set()
    for height, width in [(40, 50), (8, 300), (300, 8), *rng.randint(8, 400, size=(30, 2)).tolist()]:
        grid = processor(images=[image(0, (height, width))], return_tensors="pt")["image_grid_thw"][0]
        assert tokens.count(width, height) == int(grid.prod()) // 4, (height, width)
        counts.add(tokens.count(width, height))
    assert len(counts) > 5  # sizes decide the count


def test_chunked_prefill_prefix_cache_and_preemption(qwen2_or_3_vl):
    """5-token steps cut through the pictures; the same picture again is a prefix hit with the same answer, another
    picture is not; a pool too small for all the requests preempts and recomputes them (positions past the prompt
    rotate by their index plus the delta) with the same answers."""
    path = qwen2_or_3_vl
    hf = HF(path)
    prompt, pictures = PROMPTS[1]
    chunked = LLM(str(path), max_num_batched_tokens=5, num_kv_blocks=128, block_size=4)
    # another first picture: "A <|vision_start|>" at most, not the other picture's rows
    assert_chunks_and_cache(chunked, hf.greedy, prompt, [image(seed, size) for seed, size in pictures],
                            image(9, (64, 100)), min_hits=40, max_other_hits=7)

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = [{"prompt": f"Picture {i}: {V} tell.", "multi_modal_data": {"image": [image(20 + i, (40, 50))]}}
                for i in range(4)]
    roomy = [o.outputs[0].token_ids for o in LLM(str(path), num_kv_blocks=128).generate(requests, params)]
    tight = LLM(str(path), num_kv_blocks=24, block_size=4)  # 96 slots for 4 sequences of ~50
    assert [o.outputs[0].token_ids for o in tight.generate(requests, params)] == roomy
    assert tight.engine.stats().num_preemptions > 0
    assert roomy[0] == hf.greedy(requests[0]["prompt"], requests[0]["multi_modal_data"]["image"], 24)[0]


def test_chat_places_pictures_where_the_template_does(qwen2_vl):
    llm = LLM(str(qwen2_vl), num_kv_blocks=128)
    picture = image(7, (50, 70))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                             {"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": " what is it?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nLook: "
              f"{V} what is it?<|im_end|>\n<|im_start|>assistant\n")
    assert out.outputs[0].token_ids == HF(qwen2_vl).greedy(prompt, [picture], 6)[0]
    assert out.prompt_token_ids.count(llm.engine.image_tokens.token_id) == llm.engine.image_tokens.count(70, 50)


@pytest.mark.parametrize("version", ["2", "3"])
def test_mrope_rotation_equals_transformers_at_real_sections(version):
    """cos / sin of tokens with three unequal positions, at the released models' 128-wide heads: Qwen2-VL's sections
    (16, 24, 24) in runs, Qwen3-VL's (24, 20, 20) interleaved."""
    from transformers import Qwen2VLTextConfig, Qwen3VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    section = [16, 24, 24] if version == "2" else [24, 20, 20]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    if version == "2":
        reference = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(hidden_size=1024, num_attention_heads=8,
                                                             rope_parameters=rope))
    else:
        reference = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=128, rope_parameters={
            **rope, "mrope_interleaved": True}))
    positions = torch.tensor([[3, 9, 40, 41, 100], [3, 12, 40, 44, 7], [3, 15, 40, 50, 90]])  # temporal, h, w
    cos, sin = reference(torch.zeros(1, dtype=torch.float64), positions[:, None, :])
    rotary = RotaryEmbedding(128, 128, 1e6, None, torch.float64)
    rows = mrope_rows(rotary, positions[0], torch.arange(5), positions.T, mrope_columns(section, version == "3"))
    torch.testing.assert_close(rows.cos, cos[0].to(torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows.sin, sin[0].to(torch.float64), atol=1e-6, rtol=0)


def test_mrope_positions_fall_behind_after_each_picture():
    """Two pictures of 2 x 3 and 4 x 1 tokens: each takes its longer side's worth of positions."""
    rope, mrope, delta = mrope_positions(14, [2, 9], [(1, 2, 3), (1, 4, 1)])
    assert rope[:2].tolist() == [0, 1]
    assert mrope[:6].tolist() == [[2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4]]
    assert rope[8] == 5  # the text after the first picture: 2 + max(2, 3)
    assert mrope[6:].tolist() == [[6, 6, 6], [6, 7, 6], [6, 8, 6], [6, 9, 6]]
    assert rope[13] == 10 and delta == 10 + 1 - 14


def test_mm_processor_kwargs_resize_pictures(qwen2_vl):
    """vLLM's --mm-processor-kwargs: a lower max_pixels gives a large picture fewer tokens, and the answer equals
    transformers' with its processor sized the same; bad values and a LLaVA model are refused."""
    small = LLM(str(qwen2_vl), num_kv_blocks=128, mm_processor_kwargs={"max_pixels": 32 * 48})
    tokens = small.engine.image_tokens
    default = LLM(str(qwen2_vl), num_kv_blocks=16).engine.image_tokens
    assert tokens.count(100, 64) < default.count(100, 64)
    hf = HF(qwen2_vl)
    hf.processor.size["longest_edge"] = 32 * 48
    prompt, picture = f"See {V} now", image(8, (64, 100))
    assert loom_greedy(small, prompt, [picture], 6)[0] == hf.greedy(prompt, [picture], 6)[0]
    with pytest.raises(ValueError, match="unknown key"):
        LLM(str(qwen2_vl), mm_processor_kwargs={"max_pixel": 10})
    with pytest.raises(ValueError, match="must not exceed"):
        LLM(str(qwen2_vl), mm_processor_kwargs={"min_pixels": 5000, "max_pixels": 1000})


def test_mm_processor_kwargs_refused_for_llava(tmp_path, smollm2_path):
    from loom.models.tiny import save_tiny_vision_model

    path = save_tiny_vision_model(tmp_path / "llava", smollm2_path)
    with pytest.raises(ValueError, match="drop --mm-processor-kwargs"):
        LLM(str(path), mm_processor_kwargs={"max_pixels": 1000})


def test_adapter_on_the_language_model_matches_peft(qwen2_or_3_vl, tmp_path):
    """A peft LoRA trained on the whole Qwen2-VL / Qwen3-VL (targets in its language model: the tower's blocks are
    named otherwise; the MoE's experts are no modules peft targets), served unmerged, gives the ids of transformers'
    peft model on the same picture."""
    from peft import LoraConfig, get_peft_model

    qwen2_vl = qwen2_or_3_vl
    torch.manual_seed(4)
    hf = HF(qwen2_vl)
    peft_model = get_peft_model(hf.model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt, picture = PROMPTS[0][0], [image(9, (40, 50))]
    with torch.no_grad():
        inputs = hf.inputs(prompt, picture)
        want = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert_adapter_serves_as_peft(qwen2_vl, tmp_path / "adapter", prompt, picture, want.tolist())


def test_generate_cli_puts_the_picture_between_its_markers(qwen2_vl, tmp_path, capsys):
    import json

    from PIL import Image

    from loom.cli import main

    picture = tmp_path / "cat.png"
    image(12, (48, 64)).save(picture)
    assert main(["generate", "--model", str(qwen2_vl), "--image", str(picture), "--max-tokens", "6", "--ignore-eos",
                 "--num-kv-blocks", "32", "--json", "What is this?"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = HF(qwen2_vl).greedy(f"{V}\nWhat is this?", [Image.open(picture).convert("RGB")], 6)[0]
    assert printed["text"] == LLM(str(qwen2_vl), num_kv_blocks=32).tokenizer.decode(want)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_tower_failure_ends_only_its_request(qwen2_vl, async_scheduling):
    """The vision tower raising on one prompt's picture ends that request ("abort") and no other: the step's other
    requests answer as they would alone, the engine goes on, no KV block is left behind, and nothing computed
    without the picture reaches the prefix cache: the same picture again (in the same batch, and later, once the tower
    works) answers as a fresh engine does."""
    from tests.engine.test_engine import assert_no_leaks

    llm = LLM(str(qwen2_vl), num_kv_blocks=64, async_scheduling=async_scheduling, block_size=4)
    vision = llm.engine.vision
    encode, failures = vision.embed, [1]

    def fragile(images):  # fails on the first call with a 77-pixel-wide picture
        if any(image.width == 77 for image in images) and failures:
            failures.pop()
            raise RuntimeError("out of memory in the tower")
        return encode(images)

    vision.embed = fragile
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    good = {"prompt": f"Fine {V} picture.", "multi_modal_data": {"image": [image(1, (40, 50))]}}
    bad = {"prompt": f"Some words before the picture {V} picture.",
           "multi_modal_data": {"image": [image(2, (40, 77))]}}
    fresh = LLM(str(qwen2_vl), num_kv_blocks=64).generate([good, "plain text", bad], params)
    outs = llm.generate([good, bad, "plain text", bad], params)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "abort", "length", "length"]
    assert outs[1].outputs[0].token_ids == []
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2], outs[3])] == [o.outputs[0].token_ids for o in fresh]
    again = llm.generate(bad, params)[0]
    assert again.outputs[0].token_ids == fresh[2].outputs[0].token_ids and again.num_cached_tokens > 0
    assert_no_leaks(llm)


def test_configs_without_mrope_section_and_string_templates(qwen2_vl, tmp_path):
    """A Qwen2-VL config without mrope_section takes transformers' default (16, 24, 24), refused at load where the
    heads cannot hold it; a template that takes plain strings gets each picture between its vision markers."""
    import json
    import shutil

    from transformers import AutoConfig

    from loom.models.llama import LlamaConfig

    folder = tmp_path / "no-section"
    shutil.copytree(qwen2_vl, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["rope_parameters"]["mrope_section"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mrope_section \[16, 24, 24\] must share out the 8"):
        LLM(str(folder), num_kv_blocks=16)
    hf = AutoConfig.from_pretrained(str(folder))
    hf.text_config.head_dim = 128
    assert LlamaConfig.from_hf(hf).mrope_section == (16, 24, 24)
    # Qwen3-VL's rotary interleaves whatever its config says, by default over (24, 20, 20)
    from transformers import Qwen3VLConfig

    hf = Qwen3VLConfig(text_config={"head_dim": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
                       architectures=["Qwen3VLForConditionalGeneration"])
    cfg = LlamaConfig.from_hf(hf)
    assert (cfg.mrope_section, cfg.mrope_interleaved, cfg.deepstack_layers) == ((24, 20, 20), True, 3)

    llm = LLM(str(qwen2_vl), num_kv_blocks=64)
    llm.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image_pil", "image_pil": image(3, (40, 50))}]}]
    ids = llm.chat(messages, SamplingParams(max_tokens=2))[0].prompt_token_ids
    start, end, pad = llm.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    first, last = ids.index(pad), len(ids) - 1 - ids[::-1].index(pad)
    assert ids[first - 1] == start and ids[last + 1] == end
