"""Vision-language serving on CPU: one LLaVA through Loom's engine and through HF transformers' ``generate`` in the same
run, on the same requests (one image and a question each), alternated round by round.

    python benchmarks/vision.py --num-prompts 32 --rounds 2

The model: LLaVA-1.5's layout at a CPU-sized scale, random weights (seeded), float32. The tower is CLIP ViT-B/16 at
224 px (12 layers, hidden 768; 196 image tokens a picture, the second-to-last layer, CLS dropped), the projector two
linears with GELU, the language model SmolLM2-135M's shape (30 layers, hidden 576) with its tokenizer and ``<image>``
added. Each request: a distinct random 320 x 240 picture, a question of 8-40 words, 64 output tokens (greedy, the end
token ignored, so both produce the same count). Loom runs every request through its continuously batched, paged
engine (images encoded in the steps that reach them); transformers runs static batches of ``--hf-batch-size`` with
left padding, its processor and tower batched per batch. Prints one summary line (median output tokens/s of each and
the ratio) and writes JSON (default results/vision.json).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
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


def make_requests(n: int, seed: int) -> list[tuple[str, object]]:
    from PIL import Image

    rng = random.Random(seed)
    pixels = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
        image = Image.fromarray(pixels.randint(0, 255, (240, 320, 3), dtype=np.uint8))
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


def run_hf(model, processor, requests, batch_size: int) -> float:
    start = time.perf_counter()
    produced = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        inputs = processor(images=[img for _, img in batch], text=[p for p, _ in batch], return_tensors="pt",
                           padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                                 do_sample=False)
        produced += (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch)
    elapsed = time.perf_counter() - start
    assert produced == OUTPUT_TOKENS * len(requests)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/vision.json")
    args = ap.parse_args()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from loom import LLM
    from loom.models.catalogue import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "llava", resolve_model("smollm2"), args.seed)
        llm = LLM(str(path), seed=args.seed)
        processor = AutoProcessor.from_pretrained(str(path))
        processor.tokenizer.padding_side = "left"
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        warm = make_requests(2, args.seed + 1000)
        run_loom(llm, warm)
        run_hf(model, processor, warm, 2)
        tokens = OUTPUT_TOKENS * args.num_prompts
        loom_tps, hf_tps = [], []
        for r in range(args.rounds):
            requests = make_requests(args.num_prompts, args.seed + r)  # new pictures each round: no cache hit
            loom_tps.append(tokens / run_loom(llm, requests))
            hf_tps.append(tokens / run_hf(model, processor, requests, args.hf_batch_size))
            print(f"round {r + 1}: loom {loom_tps[-1]:.1f} tok/s, hf {hf_tps[-1]:.1f} tok/s", flush=True)
    loom, hf = statistics.median(loom_tps), statistics.median(hf_tps)
    result = {"benchmark": "vision", "model": "LLaVA layout: CLIP ViT-B/16 224 px + SmolLM2-135M shape, random",
              "num_prompts": args.num_prompts, "output_tokens": OUTPUT_TOKENS, "image_tokens": 196,
              "hf_batch_size": args.hf_batch_size, "rounds": args.rounds, "loom_tok_s": loom_tps,
              "hf_tok_s": hf_tps, "ratio": loom / hf, "machine": machine()}
    write_json(args.out, result)
    print(f"vision: loom {loom:.1f} out tok/s, transformers {hf:.1f} out tok/s, ratio {loom / hf:.2f}x "
          f"({args.num_prompts} requests x 1 image x {OUTPUT_TOKENS} tokens) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
