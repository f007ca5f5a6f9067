"""`loom serve` plugin for images: ``--image PATH|demo`` loads a model once and serves the image API (and the web UI).

    loom serve --image demo                          # API on :8000, web UI on 127.0.0.1:7860
    loom serve --image /models/sd15 --image-ui-port 0    # API only
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loom.flags import add_config_arguments, config_from_args
from loom.image.limits import ImageLimits
from loom.models.catalogue import loom_home
from loom.server.component import ExtraServer


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image generation")
    group.add_argument("--image", metavar="PATH|demo",
                       help="image model: a diffusers folder, a .safetensors file, or 'demo'")
    group.add_argument("--image-model-config", metavar="DIR",
                       help="pipeline layout for a single-file checkpoint (offline)")
    group.add_argument("--image-upscaler", default="demo", metavar="PATH|demo|none",
                       help="2x super-resolution model (default: the packaged one)")
    group.add_argument("--image-output-dir", default=None,
                       help="where result PNGs and history.jsonl go (default $LOOM_HOME/images)")
    group.add_argument("--image-max-queued", type=int, default=32, help="queued image jobs before 503 (default 32)")
    group.add_argument("--image-keep-jobs", type=int, default=200,
                       help="finished jobs kept with their files; older ones' PNGs and history lines are removed "
                            "(default 200)")
    add_config_arguments(group, ImageLimits, prefix="image_")
    group.add_argument("--image-device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    group.add_argument("--image-refiner", default=None, metavar="DIR",
                       help="SDXL refiner (diffusers folder); txt2img hands over to it at --refiner-switch of the "
                            "steps (0.8 unless the request says otherwise)")
    group.add_argument("--image-lora-dir", default=None, metavar="DIR",
                       help="folder of LoRAs (NAME.safetensors, diffusers or kohya keys, or NAME/ folders) that "
                            "requests may name; requests never give paths (default: no LoRAs)")
    group.add_argument("--image-controlnet", action="append", default=[], metavar="TYPE=DIR",
                       help="a ControlNet (diffusers folder) for controlnet jobs of TYPE canny or depth (repeatable)")
    group.add_argument("--image-depth-estimator", default=None, metavar="DIR",
                       help="transformers depth-estimation folder (DPT, Depth Anything) that makes depth maps for "
                            "depth ControlNet jobs (without it, such jobs send a ready map: control_preprocess=false)")
    group.add_argument("--image-ip-adapter", default=None, metavar="DIR",
                       help="IP-Adapter for image_prompt jobs: a folder with the weights (*.safetensors) and "
                            "image_encoder/ (h94/IP-Adapter's layout), or the weights file itself")
    group.add_argument("--image-expansion-model", default="auto", metavar="auto|NAME|PATH|none",
                       help="LLM that expands prompts of jobs asking for expansion: auto = the LLM this server serves "
                            "(--model), if any; a model name or folder (e.g. smollm2) = an engine of its own; none = "
                            "no expansion (default auto)")
    group.add_argument("--image-ui-host", default="127.0.0.1")
    group.add_argument("--image-ui-port", type=int, default=7860,
                       help="port of the Gradio web UI; 0 disables it (default 7860)")


@dataclass(slots=True)
class ImageMetrics:
    jobs: Counter
    seconds: Histogram
    queued: Gauge
    steps: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ImageMetrics:
        return cls(
            jobs=Counter("loom_image_jobs", "Finished image jobs", ["task", "status"], registry=registry),
            seconds=Histogram("loom_image_job_seconds", "Image job run time", ["task"], registry=registry,
                              buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)),
            queued=Gauge("loom_image_queue_depth", "Image jobs waiting", registry=registry),
            steps=Counter("loom_image_steps", "Sampler steps run", registry=registry),
        )


def create_component(args: argparse.Namespace, registry: CollectorRegistry) -> ImageComponent | None:
    if not getattr(args, "image", None):
        return None
    output = Path(args.image_output_dir) if args.image_output_dir else loom_home() / "images"
    api_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    return ImageComponent(
        model=args.image, registry=registry, output_dir=output,
        upscaler=None if args.image_upscaler == "none" else args.image_upscaler,
        model_config=args.image_model_config, device=args.image_device, max_queued=args.image_max_queued,
        ui_host=args.image_ui_host, ui_port=args.image_ui_port, api_url=api_url, keep_jobs=args.image_keep_jobs,
        limits=config_from_args(ImageLimits, args, prefix="image_"), api_key=getattr(args, "api_key", None),
        lora_dir=args.image_lora_dir, refiner=args.image_refiner, expansion_model=args.image_expansion_model,
        controlnets=parse_controlnets(args.image_controlnet, "--image-controlnet"),
        depth_estimator=args.image_depth_estimator, ip_adapter=args.image_ip_adapter,
    )


def parse_controlnets(values: list[str], flag: str) -> dict[str, str]:
    """["canny=/models/cn"] -> {"canny": "/models/cn"} (ValueError naming ``flag`` on a bad value)."""
    from loom.image.request import CONTROL_TYPES  # local: as the component's imports

    out = {}
    for value in values:
        kind, sep, folder = value.partition("=")
        if not sep or kind not in CONTROL_TYPES or not folder:
            raise ValueError(f"{flag} {value!r}: give TYPE=DIR with TYPE one of {', '.join(CONTROL_TYPES)}")
        out[kind] = folder
    return out


class ImageComponent:
    """The image engine + job queue + routes as a `loom serve` component; the model loads in ``start``."""

    name = "images"

    def __init__(self, model: str, registry: CollectorRegistry, output_dir: Path, upscaler: str | None = "demo",
                 model_config: str | None = None, device: str | None = None, max_queued: int = 32,
                 ui_host: str = "127.0.0.1", ui_port: int = 0, api_url: str = "http://127.0.0.1:8000", engine=None,
                 keep_jobs: int = 200, limits: ImageLimits | None = None, api_key: str | None = None,
                 lora_dir: str | None = None, refiner: str | None = None, expansion_model: str | None = None,
                 controlnets: dict[str, str] | None = None, depth_estimator: str | None = None,
                 ip_adapter: str | None = None):
        # local: the image API imports torch and PIL; `loom serve` parses its flags without them
        from loom.image.api import build_router
        from loom.image.jobs import JobQueue

        self.model, self.upscaler, self.model_config, self.device = model, upscaler, model_config, device
        self.lora_dir, self.refiner = lora_dir, refiner
        self.controlnets, self.depth_estimator, self.ip_adapter = controlnets or {}, depth_estimator, ip_adapter
        self.expansion_model = None if expansion_model in ("none", "auto") else expansion_model
        self.use_served_llm = expansion_model == "auto"
        self.llm = None
        """The LLM component of the same server (``attach``), whose engine expands prompts under 'auto'."""
        self.ui_host, self.ui_port, self.api_url, self.api_key = ui_host, ui_port, api_url, api_key
        self.queue = JobQueue(engine, output_dir, max_queued=max_queued, keep_jobs=keep_jobs,
                              metrics=ImageMetrics.create(registry))
        self._router = build_router(self.queue, limits)
        self.error: str | None = None

    def routers(self) -> list[APIRouter]:
        return [self._router]

    def attach(self, components: list) -> None:
        self.llm = next((c for c in components if c.name == "llm"), None)

    def _expansion(self):
        """What expands prompts: a model to load, the served LLM's engine, or None (called on the event loop)."""
        if self.expansion_model is not None:
            return self.expansion_model
        if self.use_served_llm and self.llm is not None:
            from loom.image.expansion import PromptExpander  # local: as above

            name = self.llm.config.served_model_names[0]
            return PromptExpander.served(self.llm.front, asyncio.get_running_loop(), name)
        return None

    async def start(self) -> None:
        if self.queue.engine is None:
            from loom.image.engine import ImageEngine  # local: torch and PIL, as above

            self.queue.engine = await asyncio.to_thread(
                ImageEngine.load, self.model, self.device, self.upscaler, self.model_config, lora_dir=self.lora_dir,
                refiner=self.refiner, expansion=self._expansion(), controlnets=self.controlnets,
                depth_estimator=self.depth_estimator, ip_adapter=self.ip_adapter,
            )
        self.queue.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.queue.stop, True)

    def health(self) -> dict:
        ready = self.queue.engine is not None and self.queue._thread is not None
        info = self.queue.engine.info() if self.queue.engine is not None else {"model": self.model}
        return {"ready": ready, "queued": self.queue.queued, "running": self.queue.current is not None} | info

    def extra_servers(self) -> list[ExtraServer]:
        if not self.ui_port:
            return []
        from loom.image.ui import build_ui_app  # local: the web UI needs gradio (the image extra) and a UI port

        return [ExtraServer(app=build_ui_app(self.api_url, self.api_key), host=self.ui_host, port=self.ui_port)]
