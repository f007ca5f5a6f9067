"""``ImageEngine``: one set of components, every task (txt2img, vary, inpaint, outpaint, upscale), step progress.

The text-to-image pipeline is loaded once; the img2img and inpaint pipelines are made from it with
``from_pipe`` (they share the very same UNet, VAE and text encoder objects). A job reports each finished step to
``on_step(done, total, latents)`` and stops when ``should_stop()`` turns true: the pipeline's interrupt flag is set
in that step's callback, so no further UNet call happens and ``JobCancelled`` is raised.

    engine = ImageEngine.load("demo")
    result = engine.generate(ImageRequest(prompt="a sneaker", seed=1))
    result.images[0].save("sneaker.png")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loom import __version__
from loom.devices import resolve_device
from loom.image import imageops
from loom.image.control import ControlNets
from loom.image.guidance import sampling_tweaks
from loom.image.loras import LoRALibrary, LoRAManager, strip_lora_tags
from loom.image.models import DEMO_UPSCALER_DIR, load_pipeline, load_refiner
from loom.image.presets import REFINER_SWITCH, UPSCALE_STRENGTH, VARY_STRENGTH, aspect_ratio_size
from loom.image.request import SIZED_TASKS, ImageRequest, ImageResult
from loom.image.samplers import make_sampler
from loom.image.speed import apply_speed_settings, default_settings
from loom.image.styles import apply_styles
from loom.image.text_encoding import encode_prompts, needs_embeddings
from loom.image.wildcards import expand_wildcards

StepHook = Callable[[int, int, torch.Tensor], None]
StopHook = Callable[[], bool]


class JobCancelled(Exception):
    """Raised by ``generate`` when ``should_stop`` asked it to stop."""


@dataclass(slots=True)
class Progress:
    """Counts steps over the (possibly several) sampler runs of one job and relays the stop request."""

    total: int
    on_step: StepHook | None = None
    should_stop: StopHook | None = None
    done: int = 0
    cancelled: bool = False
    step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    """Called after each step with the steps done in the running pipeline call (the IP-Adapter's stop-at)."""

    def callback(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        self.done += 1
        for hook in self.step_hooks:
            hook(step + 1)
        if self.on_step is not None:
            self.on_step(self.done, self.total, kwargs["latents"])
        if self.should_stop is not None and self.should_stop():
            self.cancelled = True
            pipe._interrupt = True  # NOTE: diffusers skips every later step's UNet call once this is set
        return kwargs

    def check(self) -> None:
        if self.cancelled or (self.should_stop is not None and self.should_stop()):
            raise JobCancelled()


class ImageEngine:
    def __init__(self, pipe, name: str = "model", upscaler=None, lora_dir: str | Path | None = None, refiner=None,
                 expander=None, controls: ControlNets | None = None, ip_adapter=None):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting  # optional: the image extra

        self.name = name
        self.txt2img = pipe
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        self.inpaint = AutoPipelineForInpainting.from_pipe(pipe)
        for p in (self.img2img, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.upscaler = upscaler
        self.device = pipe.device
        self.loras = LoRAManager(pipe, LoRALibrary(lora_dir) if lora_dir is not None else None)
        self.refiner = refiner
        if refiner is not None:
            refiner.set_progress_bar_config(disable=True)
        self.controls = controls if controls is not None else ControlNets(pipe)
        """The loaded ControlNets (``loom.image.control``; none by default: canny preprocessing still works)."""
        self.ip_adapter = ip_adapter
        """An ``IPAdapter`` (loom.image.ip_adapter) for image_prompt jobs; None: such jobs are refused."""
        self.expander = expander
        """A ``PromptExpander`` (loom.image.expansion) for jobs with ``expansion=True``; None: none can ask."""
        self._job_prompts: tuple[ImageRequest, tuple[list[str], list[str]]] | None = None

    @classmethod
    def load(cls, model: str, device: str | None = None, upscaler: str | None = "demo", config: str | None = None,
             speed: bool = True, lora_dir: str | None = None, refiner: str | None = None,
             expansion=None, controlnets: dict[str, str] | None = None,
             depth_estimator: str | None = None, ip_adapter: str | None = None) -> ImageEngine:
        """Load ``model`` (folder, single file or 'demo'), the 2x upscaler ('demo' = packaged, None = none), an
        optional SDXL refiner folder, and name the folder LoRAs come from (None: no LoRAs). ``expansion``: the LLM
        that expands prompts (a model name or folder for an engine of its own, or a ``PromptExpander``).
        ``controlnets``: {"canny" | "depth": ControlNet folder}; ``depth_estimator``: a depth-estimation folder;
        ``ip_adapter``: an IP-Adapter folder (weights + image_encoder/) for image prompts."""
        from loom.image.upscaler import ESPCNUpscaler  # optional: upscaler.py imports diffusers (the image extra)

        device = str(resolve_device(device))
        pipe, name = load_pipeline(model, device=device, config=config)
        refiner_pipe = load_refiner(refiner, pipe) if refiner is not None else None
        if speed:
            for p in filter(None, (pipe, refiner_pipe)):
                apply_speed_settings(p, default_settings(device))
        up = None
        if upscaler is not None:
            up_path = DEMO_UPSCALER_DIR if upscaler == "demo" else upscaler
            if not (Path(up_path) / "config.json").is_file():
                raise FileNotFoundError(f"upscaler {up_path} not found: "
                                        "pass a folder saved by ESPCNUpscaler.save_pretrained, 'demo' or None")
            up = ESPCNUpscaler.from_pretrained(str(up_path), torch_dtype=torch.float32).to(device).eval()
        if isinstance(expansion, str):
            from loom.image.expansion import PromptExpander  # local: the LLM engine loads only when asked for

            expansion = PromptExpander.load(expansion)
        controls = ControlNets.load(pipe, controlnets or {}, depth_estimator)
        adapter = None
        if ip_adapter is not None:
            from loom.image.ip_adapter import IPAdapter  # local: transformers' CLIP vision model, only when asked for

            adapter = IPAdapter.load(pipe, ip_adapter)
        return cls(pipe, name=name, upscaler=up, lora_dir=lora_dir, refiner=refiner_pipe, expander=expansion,
                   controls=controls, ip_adapter=adapter)

    # ------------------------------------------------------------ sizes
    @property
    def vae_scale(self) -> int:
        return int(self.txt2img.vae_scale_factor)

    @property
    def unit(self) -> int:
        """Pixel multiple every side must be: VAE downsampling times the UNet's downsampling."""
        return math.lcm(8, self.vae_scale * 2 ** (len(self.txt2img.unet.config.block_out_channels) - 1))

    @property
    def native(self) -> int:
        """The side, in pixels, the model was trained at (512 for SD 1.5, 32 for the demo)."""
        return int(self.txt2img.unet.config.sample_size) * self.vae_scale

    def size_for(self, req: ImageRequest) -> tuple[int, int]:
        if req.width and req.height:
            return imageops.round_size(req.width, self.unit), imageops.round_size(req.height, self.unit)
        return aspect_ratio_size(req.aspect_ratio or "1:1", self.native, self.unit)

    def output_size(self, req: ImageRequest) -> tuple[int, int]:
        """(width, height) of the job's images, known before it runs, so that it can be bounded at submission."""
        if req.task in SIZED_TASKS:
            return self.size_for(req)
        w, h = req.image.size
        if req.task == "outpaint":
            pad = imageops.outpaint_padding((w, h), req.outpaint_sides, req.outpaint_ratio, self.unit)
            return w + pad.left + pad.right, h + pad.top + pad.bottom
        if req.task == "upscale":
            w, h = round(w * req.upscale_factor), round(h * req.upscale_factor)
        return imageops.round_size(w, self.unit), imageops.round_size(h, self.unit)

    def info(self) -> dict:
        return {"model": self.name, "native_size": self.native, "size_unit": self.unit, "device": str(self.device),
                "has_upscaler": self.upscaler is not None, "has_refiner": self.refiner is not None,
                "loras": self.loras.names(),
                "expansion_model": self.expander.name if self.expander is not None else None,
                "controlnets": self.controls.types(), "has_depth_estimator": self.controls.depth_estimator is not None,
                "has_ip_adapter": self.ip_adapter is not None}

    def preview(self, latents: torch.Tensor) -> Image.Image:
        return latent_preview(latents, self.txt2img.vae)

    def check(self, req: ImageRequest) -> None:
        """What only this engine can tell before the job is queued: its LoRAs (UnknownLoRA), its refiner."""
        self.loras.check(req.lora_specs())
        if self.refiner is None and req.refiner_switch is not None and req.refiner_switch < 1:
            raise ValueError("this engine has no refiner; load one (loom serve --image-refiner DIR) "
                             "or leave refiner_switch unset")
        if req.task == "controlnet":
            self.controls.check(req.control_type, req.control_preprocess)
        if req.task == "image_prompt" and self.ip_adapter is None:
            raise ValueError("this server has no IP-Adapter for image prompts; start it with --image-ip-adapter DIR "
                             "(a folder with the IP-Adapter weights and image_encoder/)")
        if req.expansion and self.expander is None:
            raise ValueError("this server has no LLM for prompt expansion: start it with --image-expansion-model "
                             "smollm2 (or serve an LLM in the same process with --model), or leave expansion off")

    def refiner_step(self, req: ImageRequest) -> int | None:
        """The step at which a txt2img job hands over to the refiner; None: no refiner for this job."""
        if self.refiner is None or req.task != "txt2img":
            return None
        steps, _, _ = req.resolved()
        switch = REFINER_SWITCH if req.refiner_switch is None else req.refiner_switch
        k = max(1, round(steps * switch))
        return k if k < steps else None

    # ------------------------------------------------------------ entry
    def generate(self, req: ImageRequest, on_step: StepHook | None = None,
                 should_stop: StopHook | None = None) -> ImageResult:
        """Run one request to the end (or raise JobCancelled); every image comes with the settings that remake it."""
        start = time.perf_counter()
        task = {"txt2img": self._txt2img, "vary_subtle": self._vary, "vary_strong": self._vary,
                "inpaint": self._inpaint, "outpaint": self._outpaint, "upscale": self._upscale,
                "controlnet": self._controlnet, "image_prompt": self._image_prompt}[req.task]
        self.check(req)
        self.loras.activate(req.lora_specs())
        try:
            self._job_prompts = (req, self._make_prompts(req))
            if should_stop is not None and should_stop():
                raise JobCancelled()
            images, extra = task(req, on_step, should_stop)
        finally:
            self._job_prompts = None
        steps, guidance, sampler = req.resolved()
        settings = []
        for i, image in enumerate(images):
            s = req.settings() | {"seed": req.seed + i, "num_images": 1, "steps": steps, "guidance": guidance,
                                  "sampler": sampler} | asdict(req.tweaks())
            s |= {"refiner_step": self.refiner_step(req)} if self.refiner is not None else {}
            s |= {"width": image.width, "height": image.height, "model": self.name,
                  "loom_version": __version__} | extra[i]
            if req.task not in SIZED_TASKS:
                s["width"] = s["height"] = None  # sizes follow the input image
            settings.append(s)
        return ImageResult(images=images, settings=settings, seconds=time.perf_counter() - start)

    # ------------------------------------------------------------ helpers
    def _prompts(self, req: ImageRequest) -> tuple[list[str], list[str]]:
        """(prompts, negative prompts) of each image of the running job (made once per job: expansion costs)."""
        if self._job_prompts is not None and self._job_prompts[0] is req:
            return self._job_prompts[1]
        return self._make_prompts(req)

    def _make_prompts(self, req: ImageRequest) -> tuple[list[str], list[str]]:
        """Per image: wildcards expanded with that image's seed, the prompt expanded by the LLM (when asked, with
        the image's seed), then styles applied."""
        prompt = strip_lora_tags(req.prompt)
        seeds = [req.seed + i for i in range(req.num_images)]
        prompts = [expand_wildcards(prompt, seed) for seed in seeds]
        if req.expansion:
            prompts = self.expander.expand(prompts, seeds)
        pairs = [apply_styles(p, req.styles, req.negative_prompt) for p in prompts]
        return [p for p, _ in pairs], [n for _, n in pairs]

    def _call(self, pipe, req: ImageRequest, progress: Progress, seeds: list[int], prompts: list[str],
              negatives: list[str], **kwargs) -> list[Image.Image]:
        steps, guidance, sampler = req.resolved()
        if "strength" in kwargs:  # diffusers runs int(steps * strength) steps and fails on none: give it one
            steps = max(steps, math.ceil(1 / kwargs["strength"]))
        pipe.scheduler = make_sampler(sampler, self.base_scheduler_config)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with sampling_tweaks(pipe, req.tweaks(), guidance):
            out = pipe(
                **text_inputs(pipe, prompts, negatives), num_inference_steps=steps, guidance_scale=guidance,
                generator=generators, callback_on_step_end=progress.callback, **({"output_type": "pil"} | kwargs),
            )
        progress.check()
        return out.images

    def _strength_steps(self, req: ImageRequest, strength: float) -> int:
        steps, _, _ = req.resolved()
        return max(1, min(int(steps * strength), steps))

    def _extra(self, prompts: list[str]) -> list[dict]:
        return [{"final_prompt": p} for p in prompts]

    # ------------------------------------------------------------ tasks
    def _sized(self, req, on_step, should_stop):
        """What every text-to-image-shaped task starts from: (width, height), progress over all steps, prompts,
        negative prompts, seeds."""
        steps, _, _ = req.resolved()
        prompts, negatives = self._prompts(req)
        seeds = [req.seed + i for i in range(req.num_images)]
        return self.size_for(req), Progress(steps, on_step, should_stop), prompts, negatives, seeds

    def _txt2img(self, req, on_step, should_stop):
        (width, height), progress, prompts, negatives, seeds = self._sized(req, on_step, should_stop)
        k = self.refiner_step(req)
        if k is None:
            images = self._call(self.txt2img, req, progress, seeds, prompts, negatives, width=width, height=height)
        else:
            images = self._refine(req, progress, seeds, prompts, negatives, k, width=width, height=height)
        return images, self._extra(prompts)

    def _refine(self, req, progress: Progress, seeds: list[int], prompts: list[str], negatives: list[str], k: int,
                **size) -> list[Image.Image]:
        """Fooocus' refiner swap: the base model runs steps [0, k), the refiner steps [k, steps) on its latents."""
        steps, _, sampler = req.resolved()
        schedule = make_sampler(sampler, self.base_scheduler_config)
        schedule.set_timesteps(steps)
        t_k = float(schedule.timesteps[k])
        # NOTE: diffusers splits at a timestep cutoff: the base keeps t >= cutoff, the refiner t < cutoff. A cutoff of
        # floor(t_k) + 1 gives the base exactly the first k steps on any first-order schedule (integer or not).
        split = 1.0 - (math.floor(t_k) + 1) / schedule.config.num_train_timesteps
        latents = self._call(self.txt2img, req, progress, seeds, prompts, negatives, denoising_end=split,
                             output_type="latent", **size)
        return self._call(self.refiner, req, progress, seeds, prompts, negatives, image=latents,
                          denoising_start=split)

    def _controlnet(self, req, on_step, should_stop):
        """Text to image steered by a control map (made from ``req.image`` unless it is the map already)."""
        (width, height), progress, prompts, negatives, seeds = self._sized(req, on_step, should_stop)
        control = self.controls.control_map(req.control_type, req.image, (width, height), req.control_preprocess)
        images = self._call(self.controls.pipeline(req.control_type), req, progress, seeds, prompts, negatives,
                            image=control, width=width, height=height,
                            controlnet_conditioning_scale=req.control_weight, control_guidance_end=req.control_stop_at)
        return images, self._extra(prompts)

    def _image_prompt(self, req, on_step, should_stop):
        """Text to image guided by an image prompt (IP-Adapter) for the first ``ip_adapter_stop_at`` of the steps."""
        (width, height), progress, prompts, negatives, seeds = self._sized(req, on_step, should_stop)
        stop_step = max(1, round(req.ip_adapter_stop_at * progress.total))
        with self.ip_adapter.active(self.txt2img, req.ip_adapter_weight, stop_step, progress):
            images = self._call(self.txt2img, req, progress, seeds, prompts, negatives, width=width, height=height,
                                ip_adapter_image=req.image.convert("RGB"))
        return images, [e | {"ip_adapter_steps": stop_step} for e in self._extra(prompts)]

    def _vary(self, req, on_step, should_stop):
        image = imageops.fit_to_unit(req.image, self.unit)
        strength = req.denoise or VARY_STRENGTH[req.task]
        progress = Progress(self._strength_steps(req, strength), on_step, should_stop)
        prompts, negatives = self._prompts(req)
        seeds = [req.seed + i for i in range(req.num_images)]
        images = self._call(self.img2img, req, progress, seeds, prompts, negatives, image=image, strength=strength)
        return images, self._extra(prompts)

    def _inpaint(self, req, on_step, should_stop):
        image = imageops.fit_to_unit(req.image, self.unit)
        blur = req.mask_blur if req.mask_blur is not None else imageops.default_blur(image.size)
        mask = imageops.soft_mask(req.mask, image.size, blur)
        images = self._repaint(req, image, mask, mask, on_step, should_stop)
        return images, self._extra(self._prompts(req)[0])

    def _outpaint(self, req, on_step, should_stop):
        original = req.image.convert("RGB")
        pad = imageops.outpaint_padding(original.size, req.outpaint_sides, req.outpaint_ratio, self.unit)
        canvas = imageops.outpaint_canvas(original, pad)
        ramp = (req.mask_blur if req.mask_blur is not None
                else max(2, min(p for p in (pad.left, pad.right, pad.top, pad.bottom) if p) // 2))
        hard, blend = imageops.outpaint_masks(canvas.size, pad, ramp)
        images = self._repaint(req, canvas, hard, blend, on_step, should_stop)
        return images, self._extra(self._prompts(req)[0])

    def _repaint(self, req, image: Image.Image, pipe_mask: Image.Image, blend: Image.Image, on_step,
                 should_stop) -> list[Image.Image]:
        """Inpaint where ``pipe_mask`` is white, then composite with ``blend`` so untouched pixels stay exact."""
        strength = req.denoise or 1.0
        progress = Progress(self._strength_steps(req, strength), on_step, should_stop)
        prompts, negatives = self._prompts(req)
        seeds = [req.seed + i for i in range(req.num_images)]
        generated = self._call(
            self.inpaint, req, progress, seeds, prompts, negatives, image=image, mask_image=pipe_mask,
            strength=strength, width=image.width, height=image.height,
        )
        return [Image.composite(g.resize(image.size), image, blend) for g in generated]

    def _upscale(self, req, on_step, should_stop):
        """Fooocus' recipe: a super-resolution model to 2x (Lanczos down to 1.5x when asked), then a light img2img
        pass, tile by tile when large."""
        if self.upscaler is None:
            raise ValueError("this engine has no upscaler model; load one (ImageEngine.load(..., upscaler='demo'))")
        from loom.image.upscaler import upscale_image  # optional: upscaler.py imports diffusers (the image extra)

        big = upscale_image(self.upscaler, req.image.convert("RGB"))  # 2x
        if req.upscale_factor != 2.0:
            w, h = req.image.size
            big = big.resize((round(w * req.upscale_factor), round(h * req.upscale_factor)), Image.LANCZOS)
        big = imageops.fit_to_unit(big, self.unit)
        strength = req.denoise or UPSCALE_STRENGTH
        tile = max(self.native, self.unit)
        overlap = max(self.unit, tile // 4)
        xs, ys = imageops.tile_starts(big.width, tile, overlap), imageops.tile_starts(big.height, tile, overlap)
        per_tile = self._strength_steps(req, strength)
        progress = Progress(per_tile * len(xs) * len(ys) * req.num_images, on_step, should_stop)
        prompts, negatives = self._prompts(req)
        images = []
        for i in range(req.num_images):
            tiles = []
            for k, (x, y) in enumerate((x, y) for y in ys for x in xs):
                crop = big.crop((x, y, min(x + tile, big.width), min(y + tile, big.height)))
                seed = req.seed + i + 1000 * k
                out = self._call(self.img2img, req, progress, [seed], [prompts[i]], [negatives[i]], image=crop,
                                 strength=strength)[0]
                tiles.append((x, y, out.resize(crop.size)))
            images.append(imageops.blend_tiles(big.size, tiles, overlap))
        return images, self._extra(prompts)


def text_inputs(pipe, prompts: list[str], negatives: list[str]) -> dict:
    """Prompt strings when diffusers encodes them as asked; embeddings when a prompt has weights or is long."""
    if not needs_embeddings(pipe, prompts + negatives):
        return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
    return encode_prompts(pipe, prompts, negatives)


def images_equal(a: Image.Image, b: Image.Image, tolerance: int = 0) -> bool:
    """True when both images have the same size and no channel differs by more than ``tolerance``."""
    if a.size != b.size:
        return False
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= tolerance


# A1111's linear map from SD 1.x latents to RGB, for cheap previews of large images.
SD_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                 [-0.2120, -0.2616, -0.7177]]
PREVIEW_DECODE_MAX = 64 * 64  # latents up to this many positions are decoded by the VAE itself


@torch.no_grad()
def latent_preview(latents: torch.Tensor, vae) -> Image.Image:
    """A preview image of the first latent: VAE decode when small, a linear approximation when large."""
    lat = latents[:1].float()  # [1, C, h, w], scaled by vae.config.scaling_factor
    if lat.shape[-1] * lat.shape[-2] <= PREVIEW_DECODE_MAX:
        decoded = vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor).sample.float()  # [1, 3, H, W] in [-1, 1]
        rgb = (decoded[0].clamp(-1, 1) + 1) / 2
    elif lat.shape[1] == 4:
        rgb = (torch.einsum("chw,cr->rhw", lat[0], torch.tensor(SD_LATENT_RGB)) + 1) / 2
    else:
        x = lat[0, :3]
        rgb = (x - x.amin()) / (x.amax() - x.amin() + 1e-6)
    array = (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
