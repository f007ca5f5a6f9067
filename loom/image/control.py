"""ControlNet (canny, depth) for SD 1.x/2.x and SDXL: local ControlNet folders, PyraCanny and depth preprocessing.

    controls = ControlNets.load(pipe, {"canny": "/models/cn-canny", "depth": "/models/cn-depth"},
                                depth_estimator="/models/dpt-hybrid")
    control_map = controls.control_map("canny", photo, (768, 512))    # cropped to the job's size, PyraCanny edges
    pipe = controls.pipeline("canny")                                  # shares the base pipeline's UNet, VAE, CLIP

A ``task: "controlnet"`` job is text-to-image whose UNet is steered by the control map: ``control_weight`` is
diffusers' ``controlnet_conditioning_scale`` and ``control_stop_at`` its ``control_guidance_end`` (the ControlNet acts
on the first ``stop_at`` of the steps, Fooocus' "stop at"); ``control_preprocess: false`` takes the input image as
the ready map (an edge map, or a depth map with near = white). As in Fooocus, the image is first resized to cover the
job's size and centre-cropped to it (aspect kept), then preprocessed there, so edges are one pixel thin at the size the
model sees.

PyraCanny is Fooocus' multi-scale canny: an edge map at 9 scales of the image (0.2, 0.3, ..., 1.0 of its size,
area-downsampled), each scale's map blended into the running one upsampled (``0.75 * running + 0.25 * this scale``),
per colour channel, channels summed, then stretched to 0..255 between the 1st and 99th percentiles; edges that only
show at some resolution are kept. Canny here is scikit-image's (no smoothing, as OpenCV's ``cv2.Canny`` has none;
hysteresis thresholds 64 / 128 on the 0..255 scale: Fooocus' values), so no OpenCV is needed. Depth comes from a
transformers depth-estimation folder (DPT, Depth Anything, ...), normalised to 0..255 with near = white, as depth
ControlNets are trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loom.image.request import CONTROL_TYPES

PYRAMID_SCALES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CANNY_THRESHOLDS = (64, 128)
"""Hysteresis thresholds on the 0..255 intensity scale (Fooocus' defaults)."""


def canny_edges(gray: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """One channel, uint8 [H, W] -> float32 edges in {0, 1}.

    NOTE: sigma 0 because Fooocus' ``cv2.Canny`` smooths nothing: against OpenCV on three 512² photos, scikit-image
    at sigma 0 finds 75-89% as many edge pixels (its gradient is L2 where OpenCV's default is L1) and the PyraCanny
    maps correlate 0.93-0.96; at sigma 1 it found 22-61% and the maps correlated 0.53-0.82.
    """
    from skimage.feature import canny  # optional: scikit-image comes with the image extra

    low, high = CANNY_THRESHOLDS
    return canny(gray, sigma=sigma, low_threshold=low, high_threshold=high).astype(np.float32)


def _resize(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """float32 [H, W] -> [h, w] (size is (w, h)), through PIL's float mode."""
    return np.asarray(Image.fromarray(array, mode="F").resize(size, resample), dtype=np.float32)


def pyramid_canny(image: Image.Image, scales: tuple[float, ...] = PYRAMID_SCALES) -> Image.Image:
    """Fooocus' PyraCanny (see the module docstring): an RGB image of white edges on black, the input's size."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    channels = []
    for c in range(3):
        running = None
        for k in scales:
            size = (max(1, int(width * k)), max(1, int(height * k)))
            small = np.asarray(Image.fromarray(rgb[..., c]).resize(size, Image.BOX))  # area averaging
            edges = canny_edges(small)
            if running is not None:
                running = 0.75 * _resize(running, size, Image.BILINEAR) + 0.25 * edges
            else:
                running = edges
        channels.append(running)
    total = np.sum(channels, axis=0)
    return Image.fromarray(_stretch(total, 1, 99)).convert("RGB")


def _stretch(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """float [H, W] -> uint8: the ``low``..``high`` percentiles mapped to 0..255 (clipped); a flat map -> zeros."""
    lo, hi = np.percentile(x, low), np.percentile(x, high)
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return ((x - lo) / (hi - lo) * 255.0).clip(0, 255).astype(np.uint8)


def cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB ``image`` resized (Lanczos, aspect kept) to cover ``size`` = (w, h), centre-cropped to it: Fooocus'
    ``resize_image`` mode 1, with its integer sizes and offsets."""
    width, height = size
    w, h = image.size
    if width / height > w / h:  # wider than the image: fit the width, crop top and bottom
        scaled = (width, h * width // w)
    else:
        scaled = (w * height // h, height)
    left, top = scaled[0] // 2 - width // 2, scaled[1] // 2 - height // 2
    return image.convert("RGB").resize(scaled, Image.LANCZOS).crop((left, top, left + width, top + height))


def skip_when_off(model):
    """Make ``model`` (a ControlNetModel) return no residuals, without running, at conditioning scale 0.

    NOTE: diffusers' ControlNet pipelines run the ControlNet on every step and scale its residuals by 0 outside
    ``control_guidance_end`` (and at weight 0); the UNet adds nothing when handed None, and x + 0 == x, so skipping
    those calls gives the very same pixels and saves a ControlNet forward on each step after stop-at. The forward is
    replaced on the instance (as accelerate's hooks do), so hooks and ``isinstance`` checks still see the model.
    """
    forward = model.forward

    def skipping(*args, conditioning_scale: float = 1.0, guess_mode: bool = False, return_dict: bool = True,
                 **kwargs):
        if conditioning_scale == 0 and not guess_mode and not return_dict:  # guess mode pads the residuals: run it
            return None, None
        return forward(*args, conditioning_scale=conditioning_scale, guess_mode=guess_mode, return_dict=return_dict,
                       **kwargs)

    model.forward = skipping
    return model


class DepthEstimator:
    """A transformers depth-estimation model from a local folder (``AutoModelForDepthEstimation``)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"depth estimator {folder}: give a transformers depth-estimation folder "
                                    "(config.json, weights, preprocessor_config.json), e.g. a DPT or Depth Anything")
        self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        """RGB depth map of ``image``'s size, near = white (the model's relative inverse depth, stretched)."""
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        depth = self.model(**inputs).predicted_depth  # [1, h, w]
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=(image.height, image.width),
                                                mode="bicubic", align_corners=False)[0, 0]
        return Image.fromarray(_stretch(depth.cpu().numpy(), 0, 100)).convert("RGB")


class ControlNets:
    """The ControlNets a server loaded (one per control type) and their pipelines, made from the base pipeline."""

    def __init__(self, pipe, models: dict | None = None, depth_estimator: DepthEstimator | None = None):
        models = models or {}
        self.models = models
        self.depth_estimator = depth_estimator
        self._pipes = {kind: self._from_pipe(pipe, model) for kind, model in models.items()}

    @classmethod
    def load(cls, pipe, folders: dict[str, str], depth_estimator: str | None = None) -> ControlNets:
        from diffusers import ControlNetModel  # optional: diffusers comes with the image extra

        models = {}
        for kind, folder in folders.items():
            if kind not in CONTROL_TYPES:
                raise ValueError(f"unknown control type {kind!r}; give one of {', '.join(CONTROL_TYPES)}")
            if not (Path(folder) / "config.json").is_file():
                raise FileNotFoundError(f"ControlNet {kind}={folder}: give a diffusers ControlNetModel folder "
                                        "(config.json + diffusion_pytorch_model.safetensors)")
            model = ControlNetModel.from_pretrained(str(folder), torch_dtype=pipe.unet.dtype).to(pipe.device)
            models[kind] = skip_when_off(model)
        estimator = DepthEstimator(depth_estimator, pipe.device) if depth_estimator else None
        return cls(pipe, models, estimator)

    @staticmethod
    def _from_pipe(pipe, model):
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        xl = getattr(pipe, "text_encoder_2", None) is not None
        cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
        made = cls.from_pipe(pipe, controlnet=model.eval())
        made.set_progress_bar_config(disable=True)
        return made

    def types(self) -> list[str]:
        return sorted(self.models)

    def pipeline(self, kind: str):
        return self._pipes[kind]

    def check(self, kind: str, preprocess: bool) -> None:
        """What only the server knows: is this type loaded, can it preprocess (ValueError naming the flag)."""
        if kind not in self.models:
            loaded = ", ".join(self.types()) or "none"
            raise ValueError(f"no {kind} ControlNet on this server (loaded: {loaded}); start it with "
                             f"--image-controlnet {kind}=DIR")
        if kind == "depth" and preprocess and self.depth_estimator is None:
            raise ValueError("depth preprocessing needs a depth estimator: start the server with "
                             "--image-depth-estimator DIR, or send a ready depth map with control_preprocess=false")

    def control_map(self, kind: str, image: Image.Image, size: tuple[int, int], preprocess: bool = True) -> Image.Image:
        """What a job's ControlNet gets: ``image`` covering ``size`` = (w, h), then preprocessed unless it is one."""
        image = cover(image, size)
        return self.preprocess(kind, image) if preprocess else image

    def preprocess(self, kind: str, image: Image.Image) -> Image.Image:
        """The control map of ``image`` (its size): PyraCanny edges or the estimator's depth (no ControlNet needed)."""
        if kind == "canny":
            return pyramid_canny(image)
        if kind != "depth":
            raise ValueError(f"unknown control type {kind!r}; give one of {', '.join(CONTROL_TYPES)}")
        if self.depth_estimator is None:
            raise ValueError("depth preprocessing needs a depth estimator: start the server with "
                             "--image-depth-estimator DIR")
        return self.depth_estimator(image)

