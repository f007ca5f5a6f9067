"""Image generation speed: Loom's pipeline against plain diffusers on the same components, in one run.

    nice -n 10 .venv/bin/python benchmarks/images.py                  # CPU: a small SD-shaped pipeline, txt2img
    python benchmarks/images.py --cuda [--dtype bf16]                 # GPU: SD-1.5-sized UNet, 512x512, CFG batch 2
    python benchmarks/images.py --controls [--cuda]                   # IP-Adapter and LoRA switching per UNet step

CPU mode times whole text-to-image runs (steps/s = sampler steps per second) of ``ImageEngine`` (styles, seeds,
progress hooks, Loom's CPU settings) and of ``StableDiffusionPipeline`` called directly with diffusers' defaults,
alternating, seeded, same components and scheduler.

CUDA mode needs only torch and diffusers (it loads ``loom/image/speed.py`` by path, not the ``loom`` package): an
SD-1.5-shaped ``UNet2DConditionModel`` with random weights, latents 4x64x64 (512x512 pixels), batch 2 (CFG). It times
diffusers' default (fp32 eager, then fp16/bf16 eager) against Loom's speed settings (SDPA, fused QKV, channels-last,
then torch.compile) and prints one summary line with the ratio to diffusers' half-precision default.
Writes results/images_{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def load_speed_module():
    """loom/image/speed.py without importing the loom package (the GPU image has only torch + diffusers)."""
    spec = importlib.util.spec_from_file_location("loom_image_speed", ROOT / "loom" / "image" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses needs the module registered
    spec.loader.exec_module(module)
    return module


def write_result(name: str, result: dict, out_dir: str) -> Path:
    path = Path(out_dir) / f"images_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


# ---------------------------------------------------------------- CUDA
def time_unet(fn, inputs, iters: int, warmup: int) -> float:
    """Steps per second of ``fn(*inputs)`` after ``warmup`` calls (CUDA-synchronised)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(*inputs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(*inputs)
        torch.cuda.synchronize()
    return iters / (time.perf_counter() - start)


def cuda_main(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    speed = load_speed_module()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD15_UNET).eval()  # random weights, fp32: diffusers' default dtype
    params = sum(p.numel() for p in unet.parameters())
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, device="cuda", generator=g)  # [B=2 (CFG), C, H/8, W/8]
    text = torch.randn(2, 77, 768, device="cuda", generator=g)  # [B, T, D]
    t = torch.tensor(500.0, device="cuda")
    call = lambda m: (lambda x, ts, c: m(x, ts, encoder_hidden_states=c, return_dict=False)[0])  # noqa: E731
    results = {"params": params, "build_s": round(time.perf_counter() - t0, 1)}
    log = lambda k: print(f"  {k}: {results[k]:.2f} steps/s", flush=True)  # noqa: E731

    results["diffusers_fp32"] = time_unet(call(unet), (latents, t, text), args.iters // 2, 3)
    log("diffusers_fp32")
    unet.to(dtype)
    half = (latents.to(dtype), t, text.to(dtype))
    results[f"diffusers_{args.dtype}"] = time_unet(call(unet), half, args.iters, 5)
    log(f"diffusers_{args.dtype}")
    with torch.inference_mode():
        reference = call(unet)(*half).float()

    speed.apply_to_unet(unet, speed.SpeedSettings(compile_unet=False))
    results[f"loom_{args.dtype}_eager"] = time_unet(call(unet), half, args.iters, 5)
    log(f"loom_{args.dtype}_eager")
    for mode in args.compile_modes:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"  skipping compile mode {mode}: over the {args.budget_s} s budget")
            continue
        try:
            settings = speed.SpeedSettings(sdpa=False, fuse_qkv=False, channels_last=False, compile_unet=True,
                                           compile_mode=mode)
            compiled = speed.apply_to_unet(unet, settings)
            c0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(3):
                    out = call(compiled)(*half)
                torch.cuda.synchronize()
            results[f"compile_s[{mode}]"] = round(time.perf_counter() - c0, 1)
            results[f"max_abs_diff[{mode}]"] = float((out.float() - reference).abs().max())
            results[f"loom_{args.dtype}_compiled[{mode}]"] = time_unet(call(compiled), half, args.iters, 3)
            log(f"loom_{args.dtype}_compiled[{mode}]")
        except Exception as exc:  # report, keep the eager figures
            results[f"compile_error[{mode}]"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"  compile mode {mode} failed: {results[f'compile_error[{mode}]']}")
        torch._dynamo.reset()
    loom_keys = [k for k in results if k.startswith("loom_")]
    best = max(loom_keys, key=lambda k: results[k])
    base = results[f"diffusers_{args.dtype}"]
    results |= {"best": best, "speedup_vs_diffusers_half": results[best] / base,
                "speedup_vs_diffusers_fp32": results[best] / results["diffusers_fp32"]}
    results |= {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__, "dtype": args.dtype, "size": "512x512", "batch": 2,
                "iters": args.iters, "total_s": round(time.perf_counter() - t0, 1)}
    print(f"images cuda: SD-1.5-sized UNet ({params / 1e6:.0f}M) 512x512 batch 2 {args.dtype} on {results['device']}: "
          f"diffusers default {base:.2f} steps/s ({results['diffusers_fp32']:.2f} in fp32), "
          f"Loom {results[best]:.2f} steps/s "
          f"[{best}] = {results['speedup_vs_diffusers_half']:.2f}x (target >= 1.3x)")
    return results


# ---------------------------------------------------------------- controls
def controls_main(args) -> dict:
    """What an image prompt (IP-Adapter) and per-job LoRA switching add to one UNet step, against the plain step.

    The issue's GPU check: an SD-1.5-shaped UNet (random weights), 512x512 (64x64 latents), batch 2 (CFG), in
    --dtype on CUDA; on CPU a small UNet (--size pixels / 8 latents) so the path can be checked anywhere. Variants,
    round-robin, median steps/s of --repeats blocks of --iters calls:
      plain        the UNet as loaded
      ip_adapter   a random SD-1.5-shaped IP-Adapter active (4 image tokens, image embedding 1024), scale 0.6
      lora_switch  two rank-16 LoRAs (peft) on the attention projections, the active one switched every call
                   (set_adapters, as a server switching adapters between jobs does at each job's start)
    """
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from loom.image.tiny import ip_adapter_state_dict

    cuda = args.cuda
    device = "cuda" if cuda else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if cuda else torch.float32
    torch.manual_seed(0)
    config = SD15_UNET if cuda else SD15_UNET | dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                                                      sample_size=args.size // 8)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    side = config["sample_size"]
    x = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    text = torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    embed_dim = 1024 if cuda else 32
    image_embeds = [torch.randn(2, 1, embed_dim, device=device, dtype=dtype)]

    def timed(fn) -> float:
        with torch.inference_mode():
            fn()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            if cuda:
                torch.cuda.synchronize()
        return args.iters / (time.perf_counter() - start)

    plain_state = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
    unet._load_ip_adapter_weights([ip_adapter_state_dict(unet, embed_dim)])
    unet.to(device, dtype)
    ip_state = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
    for proc in unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.6]

    def use(state):
        unet.set_attn_processor(dict(state[0]))
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = state[1], state[2]

    def plain():
        unet(x, t, encoder_hidden_states=text)

    def ip():
        unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": image_embeds})

    variants = {"plain": (plain_state, plain), "ip_adapter": (ip_state, ip)}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (state, fn) in variants.items():
            use(state)
            runs[name].append(timed(fn))
    use(plain_state)
    result = {name: statistics.median(v) for name, v in runs.items()}
    try:
        from peft import LoraConfig
    except ImportError:
        result["lora_switch_error"] = "peft is not installed"
    else:
        for name in ("a", "b"):
            unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
        unet.to(device, dtype)
        calls = itertools.count()

        def switching():
            unet.set_adapters(["a"] if next(calls) % 2 else ["b"])
            plain()

        result["lora_switch"] = statistics.median(timed(switching) for _ in range(args.repeats))
    base = result["plain"]
    result |= {f"{k}_cost": base / v - 1 for k, v in list(result.items()) if k in ("ip_adapter", "lora_switch")}
    result |= {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
               "dtype": str(dtype), "latents": side, "batch": 2, "iters": args.iters, "repeats": args.repeats,
               "unet_params": sum(p.numel() for p in unet.parameters()), "runs": runs}
    costs = ", ".join(f"{k[:-5]} +{v:.1%}" for k, v in result.items() if k.endswith("_cost"))
    print(f"images controls: {'SD-1.5-sized' if cuda else 'small'} UNet, {side * 8}x{side * 8}, batch 2, {dtype}: "
          f"plain {base:.2f} steps/s; {costs} (target <= 10% each)")
    return result


# ---------------------------------------------------------------- CPU
def cpu_main(args) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from loom.image.engine import ImageEngine
    from loom.image.request import ImageRequest
    from loom.image.tiny import TinySpec, tiny_pipeline

    torch.set_num_threads(args.threads)
    spec = TinySpec(unet_channels=(32, 64, 64), layers_per_block=1, sample_size=32, vae_channels=(32, 64))
    loom_pipe = tiny_pipeline(seed=0, spec=spec)  # 64x64 pixels, 32x32 latents
    components = {k: getattr(loom_pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
    plain = StableDiffusionPipeline(**components,
                                    scheduler=EulerDiscreteScheduler.from_config(loom_pipe.scheduler.config),
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    engine = ImageEngine(loom_pipe, name="bench")
    size, steps = args.size, args.steps

    def run_loom():
        engine.generate(ImageRequest(prompt="a sneaker", seed=0, steps=steps, sampler="Euler", guidance=4.0,
                                     width=size, height=size),
                        on_step=lambda d, t, latents: None)

    def run_plain():
        plain("a sneaker", num_inference_steps=steps, guidance_scale=4.0, width=size, height=size,
              generator=torch.Generator().manual_seed(0))

    runs = {"loom": [], "diffusers": []}
    run_loom(), run_plain()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("loom", run_loom), ("diffusers", run_plain)):
            start = time.perf_counter()
            fn()
            runs[name].append(steps / (time.perf_counter() - start))
    loom, diff = statistics.median(runs["loom"]), statistics.median(runs["diffusers"])
    result = {"loom_steps_per_s": loom, "diffusers_steps_per_s": diff, "ratio": loom / diff, "runs": runs,
              "size": size, "steps": steps, "threads": args.threads,
              "unet_params": sum(p.numel() for p in loom_pipe.unet.parameters()),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(f"images cpu: {size}x{size} txt2img, {steps} Euler steps, CFG 4, {args.threads} threads: "
          f"Loom {loom:.2f} steps/s vs "
          f"diffusers {diff:.2f} steps/s = {loom / diff:.2f}x (median of {args.repeats})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="the GPU benchmark (SD-1.5-sized UNet, 512x512)")
    parser.add_argument("--controls", action="store_true",
                        help="what an IP-Adapter and LoRA switching add to a UNet step (with --cuda: SD-1.5-sized)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"])
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="skip further compile modes after this many seconds")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    if args.controls:
        result = controls_main(args)
    else:
        result = cuda_main(args) if args.cuda else cpu_main(args)
    result["command"] = " ".join(sys.argv)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    name = ("controls_" if args.controls else "") + ("cuda" if args.cuda else "cpu")
    print(f"wrote {write_result(name, result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
