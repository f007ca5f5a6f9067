"""What the quality controls cost: prompt weights / long prompts, sharpness + adaptive CFG, LoRAs, LoRA switching.

    nice -n 10 .venv/bin/python benchmarks/image_quality.py            # CPU, a small SD-shaped pipeline, 128x128

One ``ImageEngine`` on a small SD-shaped pipeline (random weights, seeded) runs the same txt2img job (Euler, CFG 4,
``--steps`` steps) in several variants, round-robin so that drift from other load hits them alike; each variant's
figure is the median of ``--repeats`` runs in sampler steps per second, and its cost the ratio to the plain job:

    plain          "a sneaker"
    weighted_long  a two-chunk prompt with (word:1.3) weights (chunked CLIP encoding, 154 cross-attention tokens)
    tweaks         sharpness 2 + adaptive CFG 3 (the UNet hooks, the bilateral filter on every step)
    loras_2        two rank-8 LoRAs at (0.5, 0.8), already loaded
    lora_switch    alternating {A} and {B} from job to job (set_adapters per job)
    diffusers_loras_2   the peer: StableDiffusionPipeline on the same components with the same adapters active

Prints one summary line; writes results/images_quality_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG = ", ".join(f"a (detailed:1.3) photo number {i} of a [plain] sneaker" for i in range(10))


def make_loras(folder: Path, spec, rank: int) -> None:
    """Two random rank-``rank`` UNet LoRAs in diffusers format (A, B), seeded."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loom.image.tiny import build_unet

    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        unet = build_unet(spec)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        StableDiffusionPipeline.save_lora_weights(folder / name, unet_lora_layers=get_peft_model_state_dict(unet))


def run(args, folder: Path) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from loom.image.engine import ImageEngine
    from loom.image.request import ImageRequest
    from loom.image.tiny import TinySpec, tiny_pipeline

    torch.set_num_threads(args.threads)
    spec = TinySpec(unet_channels=(32, 64, 64), layers_per_block=1, sample_size=32, vae_channels=(32, 64))
    make_loras(folder, spec, args.rank)
    pipe = tiny_pipeline(seed=0, spec=spec)
    pipe.set_progress_bar_config(disable=True)
    engine = ImageEngine(pipe, name="bench", lora_dir=folder)
    peer = StableDiffusionPipeline(**{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                   scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    base = dict(seed=0, steps=args.steps, sampler="Euler", guidance=4.0, width=args.size, height=args.size)
    two = [{"name": "A", "weight": 0.5}, {"name": "B", "weight": 0.8}]
    flip = [0]

    def job(**kwargs):
        return lambda: engine.generate(ImageRequest(**(base | {"prompt": "a sneaker"} | kwargs)))

    def switch():
        flip[0] ^= 1
        engine.generate(ImageRequest(**base, prompt="a sneaker", loras=[{"name": "AB"[flip[0]], "weight": 0.7}]))

    def diffusers_two():
        engine.loras.activate([])  # the peer sets its own adapters on the shared modules
        peer.enable_lora()
        peer.set_adapters([engine.loras.adapters["A"], engine.loras.adapters["B"]], [0.5, 0.8])
        peer("a sneaker", num_inference_steps=args.steps, guidance_scale=4.0, width=args.size, height=args.size,
             generator=torch.Generator().manual_seed(0))
        peer.disable_lora()

    variants = {"plain": job(), "weighted_long": job(prompt=LONG), "tweaks": job(sharpness=2.0, adaptive_cfg=3.0),
                "loras_2": job(loras=two), "lora_switch": switch, "diffusers_loras_2": diffusers_two}
    t0 = time.perf_counter()
    for fn in variants.values():  # warm-up; loads both LoRAs once
        fn()
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            runs[name].append(args.steps / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in runs.items()}
    cost = {name: median["plain"] / median[name] - 1 for name in variants if name != "plain"}
    return {"steps_per_s": median, "cost_vs_plain": cost,
            "loras_2_vs_diffusers": median["loras_2"] / median["diffusers_loras_2"], "runs": runs,
            "size": args.size, "steps": args.steps, "threads": args.threads, "lora_rank": args.rank,
            "repeats": args.repeats, "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "total_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out-dir", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loom-bench-loras-") as folder:
        result = run(args, Path(folder))
    cost = result["cost_vs_plain"]
    print(f"image quality controls cpu: {args.size}x{args.size} {args.steps} Euler steps, CFG 4, {args.threads} thr: "
          f"plain {result['steps_per_s']['plain']:.2f} steps/s; cost vs plain: weighted two-chunk prompt "
          f"{cost['weighted_long']:+.1%}, sharpness+adaptive CFG {cost['tweaks']:+.1%}, 2 LoRAs "
          f"{cost['loras_2']:+.1%} (diffusers set_adapters {cost['diffusers_loras_2']:+.1%}), "
          f"switching LoRAs per job {cost['lora_switch']:+.1%} (median of {args.repeats})")
    result["command"] = " ".join(sys.argv)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = Path(args.out_dir) / "images_quality_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
