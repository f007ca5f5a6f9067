"""Train the demo models, seeded and reproducible: a text-to-image model on Fashion-MNIST and a 2x upscaler.

    nice -n 10 python scripts/train_image_demo.py              # trains all, writes loom/image/assets/{demo,upscaler-2x}
    nice -n 10 python scripts/train_image_demo.py --eval-only  # re-prints classifier agreement and upscaler PSNR

The text-to-image model is a Stable-Diffusion-shaped pipeline (AutoencoderKL 32x32 -> 8x8x4 latents, a small
UNet2DConditionModel with cross-attention, a small CLIPTextModel over CLIP's real vocabulary) trained on real
Fashion-MNIST (Debian ``dataset-fashion-mnist``) with prompts such as "a sneaker" or "an ankle boot". Its weights are
saved in fp16 in diffusers' folder format (no tokenizer folder: Loom builds CLIP's tokenizer offline).

The script then trains a small CNN classifier on the real training set and prints how often it agrees with the
prompted class on generated images, and trains an ESPCN 2x upscaler on scikit-image's bundled photos and prints its
PSNR against bicubic on held-out photos.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loom.image.models import DEMO_DIR
from loom.image.tiny import TinySpec, build_scheduler, build_text_encoder, build_unet, build_vae

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
ASSETS = DEMO_DIR.parent  # loom/image/assets: where `loom serve --image demo` loads them from
CLASS_NAMES = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot"]
CLASS_PROMPTS = [("an " if n[0] in "aeiou" else "a ") + n for n in CLASS_NAMES]
PROMPT_TEMPLATES = ["{}", "a photo of {}", "{}, product photo", "a picture of {}", "{} on a black background"]
SUFFIXES = ["", "", "", ", high quality", ", detailed", ", cinematic", ", sharp focus", ", masterpiece", ", 4k"]
DEMO_SPEC = TinySpec(
    unet_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
    sample_size=8,
    vae_channels=(16, 32, 32),
    latent_channels=4,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
)
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")
TRAIN_PHOTOS = ("astronaut", "camera", "coins", "moon", "page", "text", "immunohistochemistry", "retina", "brick",
                "grass", "gravel", "clock", "hubble_deep_field", "colorwheel", "logo", "horse")


# ---------------------------------------------------------------- data
def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) from the Debian package's idx files."""
    prefix = "train" if split == "train" else "t10k"
    images_path = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(f"{images_path} is missing; install it: apt-get install dataset-fashion-mnist")
    images = np.frombuffer(gzip.open(images_path).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(labels_path).read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, 32, 32] in [-1, 1] (zero-padded by 2, grey as RGB)."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def sample_prompts(labels: torch.Tensor, gen: torch.Generator, drop: float = 0.1) -> list[str]:
    """A prompt per label from the templates, with random style-like suffixes; `drop` of them empty (for CFG)."""
    prompts = []
    for label in labels.tolist():
        r = torch.rand(3, generator=gen).tolist()
        if r[0] < drop:
            prompts.append("")
            continue
        template = PROMPT_TEMPLATES[int(r[1] * len(PROMPT_TEMPLATES))]
        prompts.append(template.format(CLASS_PROMPTS[label]) + SUFFIXES[int(r[2] * len(SUFFIXES))])
    return prompts


# ---------------------------------------------------------------- VAE
def train_vae(pixels: torch.Tensor, steps: int, batch: int = 32, log=print):
    vae = build_vae(DEMO_SPEC)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + batch]).latent_dist.mode() for i in range(0, len(pixels), batch)])


# ---------------------------------------------------------------- UNet + text encoder
def train_diffusion(latents: torch.Tensor, labels: torch.Tensor, tokenizer, steps: int, batch: int = 48, log=print):
    """Epsilon-prediction on SD's scaled_linear schedule; UNet and text encoder trained together."""
    unet, text_encoder, noise_sched = build_unet(DEMO_SPEC), build_text_encoder(DEMO_SPEC), build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warmup = 100
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0 = latents[idx]  # [B, C, 8, 8]
        ids = tokenizer(sample_prompts(labels[idx], gen), padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
    return unet.eval(), text_encoder.eval()


def save_demo(out: Path, unet, vae, text_encoder, tokenizer) -> None:
    """Write the pipeline as a diffusers folder (fp16 weights, no tokenizer folder)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerAncestralDiscreteScheduler.from_config(build_scheduler().config)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "tokenizer")  # rebuilt offline at load time (loom.image.tokenizer)
    pipe.to(torch.float32)


# ---------------------------------------------------------------- classifier
class FashionClassifier(nn.Module):
    """x: [B, 1, 28, 28] in [-1, 1] -> logits [B, 10]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


def train_classifier(steps: int = 1500, batch: int = 128, log=print) -> FashionClassifier:
    images, labels = load_fashion_mnist("train")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    y = torch.from_numpy(labels)
    torch.manual_seed(3)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(3)
    for _step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test_images, test_labels = load_fashion_mnist("test")
    preds = classify(model, torch.from_numpy(test_images.astype(np.float32) / 127.5 - 1.0)[:, None])
    acc = (preds == torch.from_numpy(test_labels)).float().mean()
    log(f"classifier test accuracy {acc:.4f}")
    return model.eval()


def cached_classifier(log=print) -> FashionClassifier:
    """The seeded classifier, trained once and kept under $LOOM_HOME/image (it only judges, it is not shipped)."""
    from loom.models.catalogue import loom_home

    path = loom_home() / "image" / "fashion-classifier.pt"
    if path.is_file():
        model = FashionClassifier()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_classifier(log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@torch.no_grad()
def classify(model: FashionClassifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x[i : i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])


def generated_to_classifier_input(images) -> torch.Tensor:
    """PIL 32x32 RGB images -> [N, 1, 28, 28] in [-1, 1] (centre crop, grey)."""
    arrays = [np.asarray(im.convert("L").resize((32, 32)), dtype=np.float32)[2:30, 2:30] for im in images]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0)[:, None]


@torch.no_grad()
def classifier_agreement(model_dir: Path, classifier: FashionClassifier, per_class: int, steps: int,
                         guidance: float) -> float:
    """Fraction of generated images (per_class per prompt, Loom's default sampler) the classifier puts in the
    prompted class."""
    from loom.image.engine import ImageEngine
    from loom.image.request import ImageRequest

    engine = ImageEngine.load(str(model_dir), upscaler=None)
    hits = 0
    for label, prompt in enumerate(CLASS_PROMPTS):
        images = []
        for first in range(0, per_class, 5):  # jobs of up to 5 images, seeds 1000 * (label + 1) + i
            n = min(5, per_class - first)
            req = ImageRequest(prompt=prompt, seed=1000 * (label + 1) + first, steps=steps, guidance=guidance,
                               num_images=n, styles=[])
            images += engine.generate(req).images
        preds = classify(classifier, generated_to_classifier_input(images))
        hits += int((preds == label).sum())
        print(f"  {prompt!r}: {int((preds == label).sum())}/{per_class}", flush=True)
    return hits / (per_class * len(CLASS_PROMPTS))


# ---------------------------------------------------------------- upscaler
def load_photos(names) -> list[np.ndarray]:
    """scikit-image's bundled photos as float RGB [H, W, 3] in [0, 1] (grey ones repeated)."""
    import skimage.data

    photos = []
    for name in names:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # some need a download; only the bundled ones are used
            continue
        img = np.asarray(img, dtype=np.float32)
        img = img / 255.0 if img.max() > 1.0 else img
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        photos.append(img)
    return photos


def downscale(hr: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, H/2, W/2] by area averaging (the degradation the upscaler inverts)."""
    return F.avg_pool2d(hr, 2)


def train_upscaler(steps: int, patch: int = 48, batch: int = 32, log=print):
    from loom.image.upscaler import ESPCNUpscaler

    photos = [torch.from_numpy(p).permute(2, 0, 1) for p in load_photos(TRAIN_PHOTOS)]
    log(f"upscaler: {len(photos)} training photos")
    torch.manual_seed(4)
    model = ESPCNUpscaler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(4)
    for step in range(steps):
        crops = []
        for _ in range(batch):
            p = photos[int(torch.randint(0, len(photos), (1,), generator=gen))]
            y, x = (int(torch.randint(0, s - patch, (1,), generator=gen)) for s in p.shape[1:])
            crops.append(p[:, y : y + patch, x : x + patch])
        hr = torch.stack(crops)
        loss = F.l1_loss(model(downscale(hr)), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"upscaler step {step} loss {loss.item():.4f}")
    return model.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / F.mse_loss(a.clamp(0, 1), b)))


@torch.no_grad()
def upscaler_psnr(model) -> dict[str, tuple[float, float]]:
    """{photo: (bicubic PSNR, upscaler PSNR)} on held-out photos, both in dB."""
    out = {}
    photos = load_photos(HELD_OUT_PHOTOS)
    for name, p in zip(HELD_OUT_PHOTOS, photos):
        hr = torch.from_numpy(p).permute(2, 0, 1)[None]
        hr = hr[..., : hr.shape[-2] // 2 * 2, : hr.shape[-1] // 2 * 2]
        lr = downscale(hr)
        bicubic = F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
        out[name] = (psnr(bicubic, hr), psnr(model(lr), hr))
    return out


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS))
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--upscaler-steps", type=int, default=1500)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-guidance", type=float, default=4.0)
    parser.add_argument("--num-images", type=int, default=20000, help="first N training images used")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--skip-upscaler", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    if not args.eval_only:
        train_demo(out, args, log)
        if not args.skip_upscaler:
            train_upscaler(args.upscaler_steps, log=log).to(torch.float16).save_pretrained(out / "upscaler-2x")
    return 0 if args.skip_eval else evaluate(out, args, log, time.time() - start)


def train_demo(out: Path, args, log) -> None:
    from loom.image.tokenizer import load_clip_tokenizer

    images, labels = load_fashion_mnist("train")
    images, labels = images[: args.num_images], labels[: args.num_images]
    pixels = to_model_pixels(images)
    torch.manual_seed(0)
    vae = train_vae(pixels, args.vae_steps, log=log)
    latents = encode_all(vae, pixels)  # [N, 4, 8, 8]
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latent std {latents.std():.3f} -> scaling_factor {scale:.4f}")
    torch.manual_seed(0)
    unet, text_encoder = train_diffusion(latents * scale, torch.from_numpy(labels), load_clip_tokenizer(),
                                         args.unet_steps, log=log)
    save_demo(out / "demo", unet, vae, text_encoder, load_clip_tokenizer())
    log(f"saved {out / 'demo'}")


def evaluate(out: Path, args, log, train_seconds: float) -> int:
    from loom.image.upscaler import ESPCNUpscaler

    classifier = cached_classifier(log)
    agreement = classifier_agreement(out / "demo", classifier, args.eval_per_class, args.eval_steps, args.eval_guidance)
    up = ESPCNUpscaler.from_pretrained(out / "upscaler-2x", torch_dtype=torch.float32).eval()
    scores = upscaler_psnr(up)
    for name, (bic, sr) in scores.items():
        log(f"upscaler PSNR on held-out '{name}': bicubic {bic:.2f} dB, upscaler {sr:.2f} dB ({sr - bic:+.2f})")
    mean_gain = float(np.mean([sr - bic for bic, sr in scores.values()]))
    summary = {"classifier_agreement": agreement, "upscaler_psnr_gain_db": mean_gain,
               "psnr_bicubic_vs_upscaler_db": scores}
    if train_seconds > 1:
        summary["train_seconds"] = round(train_seconds, 1)
    (out / "demo_eval.json").write_text(json.dumps(summary, indent=1))
    print(f"demo: classifier agreement {agreement:.1%} (target >= 85%), "
          f"upscaler PSNR gain over bicubic {mean_gain:+.2f} dB on {len(scores)} held-out photos")
    return 0 if agreement >= 0.85 and mean_gain > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
