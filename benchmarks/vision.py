"""Vision-language serving on CPU: one LLaVA (or Qwen2-VL, Qwen3-VL, SmolVLM, Gemma 3, Mistral 3) through Loom's
engine and through HF transformers' ``generate`` in the same run, on the same requests (one image and a question
each), alternated round by round.

    python benchmarks/vision.py --num-prompts 32 --rounds 2
    python benchmarks/vision.py --model qwen2-vl --num-prompts 32 --rounds 2
    python benchmarks/vision.py --model qwen3-vl --num-prompts 32 --rounds 2
    python benchmarks/vision.py --model smolvlm --num-prompts 32 --rounds 2
    python benchmarks/vision.py --model gemma3 --num-prompts 32 --rounds 2
    python benchmarks/vision.py --model mistral3 --num-prompts 32 --rounds 2

The model: LLaVA-1.5's layout at a CPU-sized scale, random weights (seeded), float32. The tower is CLIP ViT-B/16 at
224 px (12 layers, hidden 768; 196 image tokens a picture, the second-to-last layer, CLS dropped), the projector two
linears with GELU, the language model SmolLM2-135M's shape (30 layers, hidden 576) with its tokenizer and ``<image>``
added. Each request: a distinct random 320 x 240 picture, a question of 8-40 words, 64 output tokens (greedy, the end
token ignored, so both produce the same count). Loom runs every request through its continuously batched, paged
engine (images encoded in the steps that reach them); transformers runs static batches of ``--hf-batch-size`` with
left padding, its processor and tower batched per batch. Prints one summary line (median output tokens/s of each and
the ratio) and writes JSON (default results/vision.json).

``--model qwen2-vl``: Qwen2-VL's layout at the same scale: its vision transformer with 12 layers of width 768 on
14-pixel patches merged 2 x 2 (a 320 x 240 picture: 99 tokens), the same SmolLM2-135M-shaped language model with
M-RoPE (sections 8, 12, 12), Qwen2-VL's vision tokens and chat layout; transformers gets each batch's prompts
expanded by its image processor's grids (its full processor needs torchvision), left-padded, with the token types
its M-RoPE reads.

``--model qwen3-vl``: Qwen3-VL's layout at that scale: its vision transformer with 12 layers of width 768 on
16-pixel patches merged 2 x 2 (a 320 x 240 picture: 80 tokens), DeepStack features of layers 3, 7 and 11 added after
the language model's first three layers, the same SmolLM2-135M-shaped language model as Qwen3 (q/k norm) with
interleaved M-RoPE (sections 12, 10, 10), fed as for Qwen2-VL.

``--model gemma3``: Gemma 3's layout at that scale (``Gemma3ForConditionalGeneration``): a SigLIP tower of 12
layers of width 768 on 224-pixel pictures (14-pixel patches, 16 x 16), pooled 2 x 2 to 64 tokens an image, which
attend to each other both ways; SmolLM2-135M's shape as Gemma 3's text model (q/k norms, five sliding layers of 512
to one global). transformers runs its own processor, left-padded.

``--model mistral3``: Mistral 3's layout (``Mistral3ForConditionalGeneration``, Mistral Small 3.1's) at that scale:
a Pixtral tower of 12 layers of width 768 on 14-pixel patches, merged 2 x 2 (a 320 x 240 picture is resized to
336 x 252: 9 lines of 12 image tokens, each closed by a marker), SmolLM2-135M's shape as Mistral. transformers gets
each batch's prompts expanded by PixtralProcessor's rule (the processor needs torchvision), left-padded.

``--model smolvlm``: SmolVLM-256M's layout (``Idefics3ForConditionalGeneration``): a SigLIP tower of 12 layers of
width 768 on 512-pixel tiles (16-pixel patches), pixel shuffle by 4 (64 tokens a tile), SmolLM2-135M's shape, with
pictures' longest side resized to 1024 (SmolVLM ships 2048; 1024 keeps a CPU run short): a 320 x 240 picture is
2 x 2 tiles and the global view, 320 image tokens and their tags. transformers runs its own processor, left-padded.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_json  # noqa: E402

OUTPUT_TOKENS = 64
WORDS = ("picture image scene color shape object left right top bottom light dark small large animal person "
         "building sky water tree road car window door table what where which how many describe show tell").split()


def build_model(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import (
        AutoConfig,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from loom.models.tiny import image_tokenizer, save_vision_folder

    torch.manual_seed(seed)
    tokenizer, image_id = image_tokenizer(tokenizer_dir)
    text = AutoConfig.from_pretrained(str(tokenizer_dir))
    text.vocab_size = 49216  # room for <image> (49152), as llava-hf pads its vocabularies
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return save_vision_folder(folder, LlavaForConditionalGeneration(config).eval(), tokenizer, processor,
                              LlavaProcessor, 16, "default", 1)


def build_qwen_vl(folder: Path, tokenizer_dir: Path, seed: int, version: str = "2") -> Path:
    """Qwen2-VL's layout (``version`` "2") or Qwen3-VL's ("3": 16-pixel patches, DeepStack, Qwen3 with interleaved
    M-RoPE) at the CPU scale of the module docstring."""
    from transformers import (
        AutoConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from loom.models.tiny import QWEN_VL_TEMPLATE, QWEN_VL_TOKENS, tokenizer_with

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, QWEN_VL_TOKENS)
    start, end, image, video = tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS)
    text = AutoConfig.from_pretrained(str(tokenizer_dir)).to_dict()
    text = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
                                 "eos_token_id")}
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    if version == "2":
        config_cls, model_cls, images = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil()
        text.update(vocab_size=49216, rope_parameters={**rope, "mrope_section": [8, 12, 12]})
        vision = dict(depth=12, embed_dim=768, num_heads=12, mlp_ratio=4, hidden_size=text["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    else:
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        text.update(vocab_size=49216, head_dim=text["hidden_size"] // text["num_attention_heads"],
                    rope_parameters={**rope, "mrope_section": [12, 10, 10], "mrope_interleaved": True})
        vision = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                      out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=2304, deepstack_visual_indexes=[3, 7, 11])
    config = config_cls(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                        vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=True)
    model_cls(config).eval().save_pretrained(folder)
    images.save_pretrained(folder)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def build_smolvlm(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import (
        AutoConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from loom.models.tiny import IDEFICS3_TEMPLATE, IDEFICS3_TOKENS, tokenizer_with

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, IDEFICS3_TOKENS)
    text = AutoConfig.from_pretrained(str(tokenizer_dir)).to_dict()
    text["vocab_size"] = 49280  # SmolVLM's, with room for its tokens
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=4, tie_word_embeddings=True,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(folder)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512})
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=64,
                      chat_template=IDEFICS3_TEMPLATE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_gemma3(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import AutoConfig, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from loom.models.tiny import GEMMA3_TEMPLATE, gemma3_tokenizer

    torch.manual_seed(seed)
    tokenizer = gemma3_tokenizer(tokenizer_dir)
    text = AutoConfig.from_pretrained(str(tokenizer_dir)).to_dict()
    for key in ("architectures", "model_type", "hidden_act", "rope_scaling", "rope_parameters"):
        text.pop(key, None)
    text.update(model_type="gemma3_text", vocab_size=49216, head_dim=64, query_pre_attn_scalar=64, sliding_window=512)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=64,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' init leaves the projector at zero
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    model.save_pretrained(folder)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 224, "width": 224}), tokenizer=tokenizer,
                    image_seq_length=64, chat_template=GEMMA3_TEMPLATE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_mistral3(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import AutoConfig, Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from loom.models.tiny import MISTRAL3_TEMPLATE, PIXTRAL_TOKENS, tokenizer_with

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, PIXTRAL_TOKENS)
    text = AutoConfig.from_pretrained(str(tokenizer_dir)).to_dict()
    for key in ("architectures", "model_type"):
        text.pop(key, None)
    text.update(model_type="mistral", vocab_size=49216, head_dim=64, sliding_window=None, tie_word_embeddings=False)
    vision = dict(model_type="pixtral", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, head_dim=64, image_size=1540, patch_size=14)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2, vision_feature_layer=-1,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    images = PixtralImageProcessorPil(size={"longest_edge": 1540}, patch_size={"height": 14, "width": 14})
    images.save_pretrained(folder)
    tokenizer.chat_template = MISTRAL3_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


class Mistral3HF:
    """transformers' Mistral 3 on a batch: each [IMG] written as its picture's lines by PixtralProcessor's rule (the
    processor needs torchvision), pixels from its image processor at the merged patch, left-padded."""

    def __init__(self, path: Path):
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.images = PixtralImageProcessorPil.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()

    def __call__(self, images, text, **_) -> dict:
        pixels = self.images(images=images, patch_size={"height": 28, "width": 28}, return_tensors="pt")
        ids = []
        for prompt, (height, width) in zip(text, pixels["image_sizes"].tolist()):
            lines = ("[IMG]" * (width // 28) + "[IMG_BREAK]") * (height // 28)
            expanded = prompt.replace("[IMG]", lines.removesuffix("[IMG_BREAK]") + "[IMG_END]")
            ids.append(self.tokenizer.encode(expanded))
        width = max(map(len, ids))
        input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels["pixel_values"],
                    image_sizes=pixels["image_sizes"])


class QwenHF:
    """transformers' Qwen2-VL or Qwen3-VL on a batch: prompts expanded by the image processor's grids, left-padded."""

    def __init__(self, path: Path):
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.images = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
        self.pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def __call__(self, images, text, **_) -> dict:
        from loom.models.vision import place_image_tokens

        pixels = self.images(images=images, return_tensors="pt")
        counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
        ids = [place_image_tokens(self.tokenizer.encode(t), self.pad, [n]) for t, n in zip(text, counts)]
        width = max(map(len, ids))
        input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=(input_ids == self.pad).int(),
                    pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])


def make_requests(n: int, seed: int, layout: str = "llava") -> list[tuple[str, object]]:
    from PIL import Image

    rng = random.Random(seed)
    pixels = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
        image = Image.fromarray(pixels.randint(0, 255, (240, 320, 3), dtype=np.uint8))
        if layout in ("qwen2-vl", "qwen3-vl"):
            out.append((f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}?<|im_end|>\n"
                        "<|im_start|>assistant\n", image))
        elif layout == "mistral3":
            out.append((f"[INST][IMG]{question}?[/INST]", image))
        elif layout == "gemma3":
            out.append((f"<start_of_turn>user\n<start_of_image>{question}?<end_of_turn>\n<start_of_turn>model\n",
                        image))
        elif layout == "smolvlm":
            out.append((f"<|im_start|>User:<image>{question}?<end_of_utterance>\nAssistant:", image))
        else:
            out.append((f"USER: <image>\n{question}? ASSISTANT:", image))
    return out


def run_loom(llm, requests) -> float:
    from loom import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": img}} for p, img in requests], params)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == OUTPUT_TOKENS * len(requests)
    return elapsed


def run_hf(model, processor, requests, batch_size: int, nested: bool = False) -> float:
    """``nested``: the processor takes each prompt's pictures as a list of their own (Gemma 3's)."""
    start = time.perf_counter()
    produced = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        images = [[img] if nested else img for _, img in batch]
        inputs = processor(images=images, text=[p for p, _ in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                                 do_sample=False)
        produced += (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch)
    elapsed = time.perf_counter() - start
    assert produced == OUTPUT_TOKENS * len(requests)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["llava", "qwen2-vl", "qwen3-vl", "smolvlm", "gemma3", "mistral3"],
                    default="llava")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--mm-encoder-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="Loom's tower dtype (transformers runs float32 throughout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/vision.json")
    args = ap.parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from loom import LLM
    from loom.models.catalogue import resolve_model

    qwen = args.model in ("qwen2-vl", "qwen3-vl")
    with tempfile.TemporaryDirectory() as tmp:
        build = {"llava": build_model, "qwen2-vl": partial(build_qwen_vl, version="2"),
                 "qwen3-vl": partial(build_qwen_vl, version="3"), "smolvlm": build_smolvlm,
                 "gemma3": build_gemma3, "mistral3": build_mistral3}[args.model]
        path = build(Path(tmp) / args.model, resolve_model("smollm2"), args.seed)
        llm = LLM(str(path), seed=args.seed, mm_encoder_dtype=args.mm_encoder_dtype)
        if qwen or args.model == "mistral3":
            processor = QwenHF(path) if qwen else Mistral3HF(path)
            model = processor.model
        else:
            processor = AutoProcessor.from_pretrained(str(path))
            processor.tokenizer.padding_side = "left"
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
        image_tokens = llm.engine.image_tokens.count(320, 240)
        warm = make_requests(2, args.seed + 1000, args.model)
        run_loom(llm, warm)
        nested = args.model == "gemma3"
        run_hf(model, processor, warm, 2, nested)
        tokens = OUTPUT_TOKENS * args.num_prompts
        loom_tps, hf_tps = [], []
        for r in range(args.rounds):
            requests = make_requests(args.num_prompts, args.seed + r, args.model)  # new pictures: no cache hit
            loom_tps.append(tokens / run_loom(llm, requests))
            hf_tps.append(tokens / run_hf(model, processor, requests, args.hf_batch_size, nested))
            print(f"round {r + 1}: loom {loom_tps[-1]:.1f} tok/s, hf {hf_tps[-1]:.1f} tok/s", flush=True)
    loom, hf = statistics.median(loom_tps), statistics.median(hf_tps)
    described = {"qwen2-vl": "Qwen2-VL layout: 12-layer ViT (768) on 14 px patches merged 2x2 + SmolLM2-135M shape, "
                             "M-RoPE, random",
                 "qwen3-vl": "Qwen3-VL layout: 12-layer ViT (768) on 16 px patches merged 2x2, DeepStack 3 layers + "
                             "SmolLM2-135M shape as Qwen3, interleaved M-RoPE, random",
                 "smolvlm": "SmolVLM-256M layout: SigLIP 12 layers (768) on 512 px tiles, pixel shuffle 4, "
                            "SmolLM2-135M shape, longest side 1024, random",
                 "gemma3": "Gemma 3 layout: SigLIP 12 layers (768) on 224 px, 14 px patches pooled 2x2 (64 tokens, "
                           "attended both ways) + SmolLM2-135M shape as Gemma 3 text (window 512), random",
                 "mistral3": "Mistral 3 layout: Pixtral tower 12 layers (768) on 14 px patches merged 2x2, pictures at "
                             "their own resolution + SmolLM2-135M shape as Mistral, random",
                 "llava": "LLaVA layout: CLIP ViT-B/16 224 px + SmolLM2-135M shape, random"}[args.model]
    result = {"benchmark": "vision", "model": described,
              "num_prompts": args.num_prompts, "output_tokens": OUTPUT_TOKENS, "image_tokens": image_tokens,
              "hf_batch_size": args.hf_batch_size, "loom_mm_encoder_dtype": args.mm_encoder_dtype,
              "rounds": args.rounds, "loom_tok_s": loom_tps, "hf_tok_s": hf_tps, "ratio": loom / hf,
              "machine": machine()}
    write_json(args.out, result)
    print(f"vision ({args.model}): loom {loom:.1f} out tok/s, transformers {hf:.1f} out tok/s, ratio {loom / hf:.2f}x "
          f"({args.num_prompts} requests x 1 image x {OUTPUT_TOKENS} tokens) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
