"""Gemma 3's vision-language model: Loom's prompt ids, greedy ids and logprobs equal HF transformers' on a tiny random
checkpoint, where an image's tokens attend to each other both ways (transformers' mask) and the rest is causal:
one and several pictures, through each attention backend, chunked prefill that never cuts an image, prefix hits that
end inside one, and preemption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from loom import LLM, SamplingParams
from loom.models import gemma3_vision
from loom.models.tiny import save_tiny_gemma3_vision
from tests.engine.test_vision import assert_chunks_and_cache, hf_generate, image, loom_greedy


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, smollm2_path):
    return save_tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3-vision"), smollm2_path)


class HF:
    def __init__(self, path):
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()

    def ids(self, prompt: str, images: list) -> list[int]:
        return self.processor(images=[images] if images else None, text=prompt)["input_ids"][0]

    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[float]]:
        inputs = self.processor(images=[images] if images else None, text=prompt, return_tensors="pt")
        return hf_generate(self.model, inputs, max_tokens)


TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PROMPTS = [
    (TURN.format("<start_of_image>What is it?"), [(1, (40, 50))]),
    (TURN.format("Compare\n<start_of_image> and <start_of_image><start_of_image>them"),
     [(2, (90, 30)), (3, (20, 20)), (4, (64, 64))]),
    (TURN.format("Plain text, no picture."), []),
    ("Ends on <start_of_image>", [(5, (20, 120))]),
]


def assert_equals_hf(llm: LLM, hf: HF, prompts=PROMPTS, max_tokens: int = 10) -> None:
    for prompt, pictures in prompts:
        images = [image(seed, size) for seed, size in pictures]
        want_ids, want_lp = hf.greedy(prompt, images, max_tokens)
        request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
        out = llm.generate(request, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0,
                                                   ignore_eos=True))[0]
        assert out.prompt_token_ids == hf.ids(prompt, images), prompt
        assert out.outputs[0].token_ids == want_ids, prompt
        lp = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, want_ids)]
        np.testing.assert_allclose(lp, want_lp, atol=2e-4)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_greedy_equals_hf(gemma3, backend):
    """Triton's kernels (interpreted on a CPU) on the prompt of three pictures, two of them side by side."""
    llm = LLM(str(gemma3), attention_backend=backend, num_kv_blocks=128, enable_prefix_caching=False,
              dtype="float32")
    if backend == "triton":
        assert_equals_hf(llm, HF(gemma3), PROMPTS[1:2], max_tokens=4)
    else:
        assert_equals_hf(llm, HF(gemma3))


def test_images_attended_one_way_would_differ(gemma3, monkeypatch):
    """The both-ways spans matter on this checkpoint: without them (causal image tokens, what vLLM's attention
    backends other than FlexAttention and Triton did) the logprobs move."""
    hf = HF(gemma3)
    prompt, pictures = PROMPTS[0]
    images = [image(seed, size) for seed, size in pictures]
    want = hf.greedy(prompt, images, 6)
    monkeypatch.setattr(gemma3_vision, "image_spans", lambda positions: None)
    llm = LLM(str(gemma3), num_kv_blocks=64, enable_prefix_caching=False)
    ids, lp = loom_greedy(llm, prompt, images, 6)
    assert ids != want[0] or np.abs(np.asarray(lp) - want[1]).max() > 1e-3


@pytest.mark.parametrize("text", [
    "A<start_of_image>B", "A\n<start_of_image>\nB", "A\n\n\n<start_of_image>\n\n\nB", "<start_of_image>",
    "x\n<start_of_image><start_of_image>\n<start_of_image>y", "\n\n<start_of_image>\n",
    "a" + "\n" * 40 + "<start_of_image>" + "\n" * 3,
])  # fmt: skip
def test_expansion_equals_the_processors_text(gemma3, text):
    """The placeholders expanded as token ids, the newlines around them merged with the prompt's, equal the ids of
    the processor's text expansion (HF tokenizes "\\n" + "\\n\\n" as one token)."""
    hf = HF(gemma3)
    tokens = LLM(str(gemma3), num_kv_blocks=16).engine.image_tokens
    images = [image(i) for i in range(text.count("<start_of_image>"))]
    plain = hf.processor.tokenizer.encode(text)
    assert tokens.place(plain, [(50, 40)] * len(images)) == hf.ids(text, images)
    already = hf.ids(text, images)
    assert tokens.place(already, [(50, 40)] * len(images)) == already  # expanded already: left as it is


def test_spans_are_the_runs_of_image_tokens():
    spans = gemma3_vision.image_spans(np.array([3, 4, 5, 9, 10, 12]))
    assert spans.tolist() == [[3, 6], [9, 11], [12, 13]]


def test_chunked_prefill_prefix_cache_and_preemption(gemma3):
    """16-token pictures under 20-token steps: a chunk stops before a picture it cannot hold whole, one that starts
    inside a picture (after a prefix hit in 4-token blocks) reaches its end; the same pictures again hit the cache
    inside them with the same answer; a pool too small for all the requests preempts and recomputes them."""
    hf = HF(gemma3)
    prompt, pictures = PROMPTS[1]
    cuts = []

    def spied(llm: LLM) -> LLM:  # every pictured chunk scheduled: (start, end, the prompt's images)
        schedule = llm.engine.scheduler.schedule

        def spy():
            out = schedule()
            cuts.extend((c.start, c.end, c.seq.images) for c in out.chunks if c.seq.images is not None)
            return out

        llm.engine.scheduler.schedule = spy
        return llm

    chunked = spied(LLM(str(gemma3), max_num_batched_tokens=20, num_kv_blocks=128, block_size=4))
    assert_chunks_and_cache(chunked, hf.greedy, prompt, [image(seed, size) for seed, size in pictures],
                            image(9, (90, 30)), min_hits=40, max_other_hits=8)
    # a picture shared, the question after it not: the hit ends where the 8-token blocks do, for some leads inside
    # the picture (its last tokens recomputed against the cached ones)
    picture = image(10, (30, 60))
    chunked = spied(LLM(str(gemma3), max_num_batched_tokens=20, num_kv_blocks=128, block_size=8))
    for lead in ("", "a", "a b", "a b c"):
        for question in ("left?", "right?"):
            prompt = TURN.format(f"{lead}<start_of_image>{question}")
            assert loom_greedy(chunked, prompt, [picture], 6)[0] == hf.greedy(prompt, [picture], 6)[0]
    assert len(cuts) > 10
    for start, end, images in cuts:  # no chunk ends strictly inside a span
        assert not any(first < end < last for first, last in images.spans.tolist()), (start, end)
    assert any(first < start < last for start, _, images in cuts for first, last in images.spans.tolist())

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = [{"prompt": TURN.format(f"Picture {i}: <start_of_image> tell."),
                 "multi_modal_data": {"image": [image(20 + i, (40, 50))]}} for i in range(4)]
    roomy = [o.outputs[0].token_ids for o in LLM(str(gemma3), num_kv_blocks=128).generate(requests, params)]
    tight = LLM(str(gemma3), num_kv_blocks=20, block_size=4)  # 80 slots for 4 sequences of ~55
    assert [o.outputs[0].token_ids for o in tight.generate(requests, params)] == roomy
    assert tight.engine.stats().num_preemptions > 0
    assert roomy[0] == hf.greedy(requests[0]["prompt"], requests[0]["multi_modal_data"]["image"], 24)[0]


def test_chat_and_the_step_size_refusal(gemma3):
    llm = LLM(str(gemma3), num_kv_blocks=128)
    picture = image(7, (50, 70))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                             {"type": "image_pil", "image_pil": picture},
                                             {"type": "text", "text": "what is it?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    hf = HF(gemma3)
    text = hf.processor.tokenizer.bos_token + TURN.format("Look:<start_of_image>what is it?")
    assert out.prompt_token_ids == hf.ids(text, [picture])
    assert out.outputs[0].token_ids == hf.greedy(text, [picture], 6)[0]
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 16"):
        LLM(str(gemma3), max_num_batched_tokens=12, num_kv_blocks=16)


def test_generate_cli_and_string_templates_write_start_of_image(gemma3, tmp_path, capsys):
    """Where Loom writes the placeholder itself (the CLI's --image in front of a prompt; a chat template that reads
    content as a string), it writes <start_of_image>, which the engine expands, not the image token."""
    import json

    from loom.cli import main

    picture = tmp_path / "cat.png"
    image(12).save(picture)
    assert main(["generate", "--model", str(gemma3), "--image", str(picture), "--max-tokens", "6", "--ignore-eos",
                 "--num-kv-blocks", "32", "--json", "What is this?"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf = HF(gemma3)
    from PIL import Image

    seen = Image.open(picture).convert("RGB")
    assert printed["text"] == hf.processor.tokenizer.decode(hf.greedy("<start_of_image>\nWhat is this?", [seen], 6)[0])

    llm = LLM(str(gemma3), num_kv_blocks=64)
    llm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": seen},
                                             {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids.count(llm.engine.image_tokens.token_id) == 16
    assert out.prompt_token_ids == hf.ids("user: <start_of_image>\nWhat is this?\n", [seen])


def test_image_tokens_side_by_side_past_the_step_are_refused(gemma3):
    """Two images' tokens written side by side (already expanded, no markers between) make one 32-token span, which
    transformers also attends both ways: past a 20-token step it could never be scheduled whole, so it is refused
    instead of waiting forever."""
    llm = LLM(str(gemma3), max_num_batched_tokens=20, num_kv_blocks=64)
    soft = llm.engine.image_tokens.token_id
    ids = llm.tokenizer.encode("Look:") + [soft] * 32 + llm.tokenizer.encode("ok?")
    request = {"prompt_token_ids": ids, "multi_modal_data": {"image": [image(1), image(2)]}}
    with pytest.raises(ValueError, match="one span of 32 tokens"):
        llm.generate(request, SamplingParams(max_tokens=2))
    wide = LLM(str(gemma3), max_num_batched_tokens=64, num_kv_blocks=64)  # room for it: served as transformers does
    assert len(wide.generate(request, SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2


def test_image_tokens_typed_as_text_are_not_an_expansion(gemma3):
    """A message that types an image's worth of <image_soft_token> beside a real picture's bare <start_of_image>
    is not taken as expanded (the picture's rows would land on the typed tokens): it is expanded, and the count
    then tells the prompt is not the pictures'."""
    llm = LLM(str(gemma3), num_kv_blocks=64)
    prompt = TURN.format("<start_of_image>Say: " + "<image_soft_token>" * 16)
    with pytest.raises(ValueError, match="32 image tokens where its 1 images take 16"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image(1)]}}, SamplingParams(max_tokens=2))


def test_adapter_on_the_language_model_matches_peft(gemma3, tmp_path):
    """A peft LoRA on Gemma 3's language model (a regex keeps the tower's like-named projections out), served
    unmerged on a pictured prompt (its spans through the adapter's layers): peft's ids."""
    from peft import LoraConfig, get_peft_model

    from tests.engine.test_vision import assert_adapter_serves_as_peft

    torch.manual_seed(5)
    hf = HF(gemma3)
    targets = r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)"
    peft_model = get_peft_model(hf.model, LoraConfig(r=4, lora_alpha=64, target_modules=targets,
                                                     init_lora_weights=False)).eval()  # strong: it moves the answer
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt, pictures = PROMPTS[1]
    picture = [image(seed, size) for seed, size in pictures]
    inputs = hf.processor(images=[picture], text=prompt, return_tensors="pt")
    with torch.no_grad():
        want = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert_adapter_serves_as_peft(gemma3, tmp_path / "adapter", prompt, picture, want.tolist())
