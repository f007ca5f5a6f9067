"""Loading an image model once: a diffusers folder, a single-file checkpoint, or ``demo`` (the packaged model).

    pipe, name = load_pipeline("demo")                       # Fashion-MNIST demo (weights in loom/image/assets)
    pipe, name = load_pipeline("/models/sd15")               # any SD 1.x / 2.x / SDXL diffusers folder
    pipe, name = load_pipeline("/models/x.safetensors", config="/models/sd15")   # single file, offline config
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loom.image.speed import default_dtype
from loom.image.tokenizer import load_clip_tokenizer

ASSETS = Path(__file__).parent / "assets"
DEMO_DIR = ASSETS / "demo"
DEMO_UPSCALER_DIR = ASSETS / "upscaler-2x"


def resolve_model_path(model: str) -> Path:
    if model == "demo":
        if not (DEMO_DIR / "model_index.json").is_file():
            raise FileNotFoundError(f"the demo model is missing from {DEMO_DIR}; "
                                    "train it: python scripts/train_image_demo.py")
        return DEMO_DIR
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image model {model!r} not found: "
                                "pass a diffusers folder, a .safetensors/.ckpt file, or 'demo'")
    return path


def _missing_parts(folder: Path) -> dict:
    """Components listed in model_index.json but absent on disk that Loom can supply offline (the CLIP tokenizer)."""
    index = json.loads((folder / "model_index.json").read_text())
    extra = {}
    for name in ("tokenizer",):
        if name in index and index[name][0] is not None and not (folder / name).is_dir():
            extra[name] = load_clip_tokenizer()
    return extra


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype | None = None, config: str | None = None):
    """(text-to-image pipeline, display name) from a folder, a single file, or 'demo'."""
    from diffusers import AutoPipelineForText2Image  # optional: diffusers comes with the image extra

    dtype = dtype or default_dtype(device)
    path = resolve_model_path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        pipe = AutoPipelineForText2Image.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                         **_missing_parts(path))
    else:
        pipe = _load_single_file(path, dtype, config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), ("demo" if model == "demo" else path.name)


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # optional: the image extra

    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{path}: a single-file model must be .safetensors or .ckpt")
    is_xl = False
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            is_xl = any(k.startswith("conditioner.") for k in f.keys())
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    if config is None:
        raise ValueError(
            f"{path.name}: loading a single-file checkpoint offline needs its pipeline layout; pass --model-config DIR "
            "(a diffusers folder of the same architecture, e.g. a converted SD 1.5 or SDXL)"
        )
    return cls.from_single_file(str(path), config=config, torch_dtype=dtype, local_files_only=True)


def load_refiner(path: str, base):
    """An SDXL refiner (``StableDiffusionXLImg2ImgPipeline``) from a diffusers folder, sharing ``base``'s VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline  # optional: diffusers comes with the image extra

    folder = resolve_model_path(path)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"refiner {path}: give a diffusers folder of an SDXL refiner (with model_index.json)")
    extra = {} if (folder / "tokenizer_2").is_dir() else {"tokenizer_2": load_clip_tokenizer()}
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder), vae=base.vae, torch_dtype=base.dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(base.device)
