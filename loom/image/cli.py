"""`loom imagine`: generate images from a prompt on the command line (every task, offline).

    loom imagine "a sneaker" --model demo --out sneaker.png --seed 7 --steps 20
    loom imagine "a dress" --model /models/sd15 --style Photograph --style Sharp --aspect-ratio 3:2 -n 4 --out dress.png
    loom imagine "a bag" --model demo --task vary_strong --image in.png --out varied.png
    loom imagine --model demo --from-png sneaker.png --out again.png     # reproduce from the PNG's settings
    loom imagine "a (red:1.3) coat <lora:film:0.6>" --model /models/sd15 --lora-dir /models/loras --sharpness 4
    loom imagine "a house" --model /models/sd15 --task controlnet --controlnet canny=/models/cn-canny --image photo.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument("--model", default="demo", help="diffusers folder, .safetensors file, or 'demo' (default)")
    parser.add_argument("--model-config", default=None, help="pipeline layout folder for a single-file checkpoint")
    parser.add_argument("--out", default="image.png", help="output PNG; with -n > 1, NAME-0.png, NAME-1.png, ...")
    parser.add_argument("--task", default="txt2img",
                        choices=["txt2img", "vary_subtle", "vary_strong", "inpaint", "outpaint", "upscale",
                                 "controlnet", "image_prompt"])
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--style", action="append", default=[],
                        help="a style name (repeatable; --list-styles shows them)")
    parser.add_argument("--performance", default="Speed",
                        help="Quality, Speed, Extreme Speed or a preset of $LOOM_PRESETS (default Speed)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", default=None, help="Euler a, DPM++ 2M Karras, UniPC, LCM, ...")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--aspect-ratio", default=None, help="W:H at the model's native size, e.g. 16:9")
    parser.add_argument("-n", "--num-images", type=int, default=1)
    parser.add_argument("--image", default=None, help="input image for vary / inpaint / outpaint / upscale")
    parser.add_argument("--mask", default=None, help="inpaint mask (white = repaint)")
    parser.add_argument("--denoise", type=float, default=None, help="strength for image tasks")
    parser.add_argument("--sides", default="left,right", help="outpaint: comma-separated sides")
    parser.add_argument("--from-png", default=None, help="take every setting from a PNG Loom wrote")
    parser.add_argument("--upscaler", default="demo",
                        help="2x super-resolution model folder, 'demo' (packaged) or 'none'")
    parser.add_argument("--sharpness", type=float, default=None, help="0..30 (default: the preset's; Quality 2)")
    parser.add_argument("--adaptive-cfg", type=float, default=None,
                        help="guidance above this is eased in, 1..30 (default: the preset's; Quality 7)")
    for side, fooocus in (("positive", 1.5), ("negative", 0.8)):
        parser.add_argument(f"--adm-scaler-{side}", type=float, default=None,
                            help=f"SDXL size-conditioning factor, 0.1..3 (default: the preset's; Quality {fooocus})")
    parser.add_argument("--adm-scaler-end", type=float, default=None,
                        help="SDXL: ADM scaling until this fraction of sampling (default: the preset's; Quality 0.3)")
    parser.add_argument("--upscale-factor", type=float, default=2.0, choices=[1.5, 2.0], help="upscale: 1.5 or 2")
    parser.add_argument("--refiner", default=None, help="SDXL refiner folder (txt2img hands over to it)")
    parser.add_argument("--refiner-switch", type=float, default=None,
                        help="fraction of the steps the base model runs before the refiner (default 0.8)")
    parser.add_argument("--lora-dir", default=None, help="folder of LoRAs that --lora and <lora:NAME:W> tags name")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                        help="a LoRA from --lora-dir with its weight (default 1; repeatable, at most 5)")
    parser.add_argument("--controlnet", action="append", default=[], metavar="TYPE=DIR",
                        help="a ControlNet folder for --task controlnet (TYPE canny or depth; repeatable)")
    parser.add_argument("--depth-estimator", default=None, metavar="DIR",
                        help="transformers depth-estimation folder that makes depth maps from --image")
    parser.add_argument("--control-type", default="canny", choices=["canny", "depth"])
    parser.add_argument("--control-weight", type=float, default=1.0, help="the ControlNet's scale, 0..2")
    parser.add_argument("--control-stop-at", type=float, default=0.5,
                        help="the ControlNet acts on this first fraction of the steps (default 0.5)")
    parser.add_argument("--no-control-preprocess", action="store_true",
                        help="--image is the control map already (edges, or a depth map with near = white)")
    parser.add_argument("--ip-adapter", default=None, metavar="DIR",
                        help="IP-Adapter folder (weights + image_encoder/) for --task image_prompt (--image: the "
                             "image prompt)")
    parser.add_argument("--ip-adapter-weight", type=float, default=0.6, help="the image prompt's scale, 0..2")
    parser.add_argument("--ip-adapter-stop-at", type=float, default=0.5,
                        help="the image prompt acts on this first fraction of the steps (default 0.5)")
    parser.add_argument("--expansion", action="store_true",
                        help="expand the prompt with an LLM first (Fooocus' V2; seeded by the image seed)")
    parser.add_argument("--expansion-model", default="smollm2", metavar="NAME|PATH",
                        help="the LLM --expansion uses (default smollm2, the packaged one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--list-styles", action="store_true")


def build_request(args: argparse.Namespace):
    # local: these import PIL; `loom imagine --help` imports this module and must not pay for it
    from PIL import Image

    from loom.image.metadata import request_from_png
    from loom.image.request import ImageRequest

    image = Image.open(args.image) if args.image else None
    mask = Image.open(args.mask) if args.mask else None
    if args.from_png:
        return request_from_png(args.from_png, image=image, mask=mask)
    if not args.prompt and args.task == "txt2img":
        raise ValueError('give a prompt: loom imagine "a sneaker" --model demo')
    return ImageRequest(
        task=args.task, prompt=args.prompt or "", negative_prompt=args.negative, styles=args.style,
        performance=args.performance, steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed,
        width=args.width, height=args.height, aspect_ratio=args.aspect_ratio, num_images=args.num_images,
        denoise=args.denoise, image=image, mask=mask, loras=[parse_lora_flag(v) for v in args.lora],
        upscale_factor=args.upscale_factor, refiner_switch=args.refiner_switch, sharpness=args.sharpness,
        adaptive_cfg=args.adaptive_cfg, adm_scaler_positive=args.adm_scaler_positive,
        adm_scaler_negative=args.adm_scaler_negative, adm_scaler_end=args.adm_scaler_end, expansion=args.expansion,
        control_type=args.control_type, control_weight=args.control_weight, control_stop_at=args.control_stop_at,
        control_preprocess=not args.no_control_preprocess, ip_adapter_weight=args.ip_adapter_weight,
        ip_adapter_stop_at=args.ip_adapter_stop_at,
        outpaint_sides=[s.strip() for s in args.sides.split(",") if s.strip()] if args.task == "outpaint" else [],
    )


def parse_lora_flag(value: str) -> dict:
    """"NAME" or "NAME:WEIGHT" -> {"name", "weight"}."""
    name, _, weight = value.rpartition(":") if ":" in value else (value, "", "")
    try:
        return {"name": name, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ValueError(f"--lora {value!r}: give NAME or NAME:WEIGHT, e.g. --lora film-grain:0.8") from None


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    if args.list_styles:
        from loom.image.styles import load_styles  # local: `loom imagine --help` stays ~40 ms without its imports

        print("\n".join(load_styles()))
        return 0
    # local: the engine imports torch; `loom imagine --help` and --list-styles run without it
    from loom.image.engine import ImageEngine
    from loom.image.metadata import save_png
    from loom.image.serve import parse_controlnets

    try:
        request = build_request(args)
        start = time.perf_counter()
        upscaler = None if args.upscaler == "none" else args.upscaler
        engine = ImageEngine.load(args.model, device=args.device, upscaler=upscaler, config=args.model_config,
                                  lora_dir=args.lora_dir, refiner=args.refiner,
                                  expansion=args.expansion_model if request.expansion else None,
                                  controlnets=parse_controlnets(args.controlnet, "--controlnet"),
                                  depth_estimator=args.depth_estimator, ip_adapter=args.ip_adapter)
        loaded = time.perf_counter() - start
        result = engine.generate(request, on_step=_print_step)
    except (ValueError, FileNotFoundError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    for path, image, settings in zip(output_paths(args.out, len(result.images)), result.images, result.settings):
        save_png(image, path, settings)
        print(f"\n{path} {image.width}x{image.height} seed {settings['seed']}")
        if request.expansion:
            print(f"prompt: {settings['final_prompt']}")
    print(f"loaded in {loaded:.1f} s, generated in {result.seconds:.1f} s")
    return 0


def _print_step(done: int, total: int, latents) -> None:
    print(f"\rstep {done}/{total}", end="", flush=True)
