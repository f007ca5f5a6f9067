"""HTTP routes of the image generator, mounted by ``loom serve --image``.

    POST /v1/images/generations          OpenAI's shape: {prompt, n, size, response_format: b64_json | url}
    POST /v1/images/jobs                 submit any task (txt2img, vary_subtle, vary_strong, inpaint, outpaint, upscale,
                                         controlnet, image_prompt)
    GET  /v1/images/jobs                 history, newest first (?status=succeeded)
    GET  /v1/images/jobs/{id}            poll: status, progress, settings, file names (?preview=true adds the preview)
    GET  /v1/images/jobs/{id}/events     server-sent events: one per progress change, then the final state
    POST /v1/images/jobs/{id}/cancel     (also DELETE /v1/images/jobs/{id})
    GET  /v1/images/files/{id}/{name}    a result PNG (settings in its metadata)
    GET  /v1/images/options              styles, samplers, presets, aspect ratios, model facts
    POST /v1/images/control/preprocess   the control map of an image (PyraCanny edges, estimated depth)

Every job is bounded before it is queued: prompt length, styles, images per job, and the pixels of its result and of
its input images (an input's size is read from its header, before it is decoded; decoding runs off the event loop).
Waiting for a job (SSE streams, ``/generations``) awaits the job's changes on the event loop, not in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, Field

from loom.image.jobs import FINISHED, Job, JobQueue, QueueFull
from loom.image.limits import DEFAULT_MAX_PIXELS, ImageLimits, TooLarge, check_pixels
from loom.image.loras import MAX_LORA_WEIGHT, MAX_LORAS, NAME, UnknownLoRA
from loom.image.presets import ASPECT_RATIOS, UPSCALE_FACTORS, get_performance, load_performances
from loom.image.request import (
    CONTROL_TYPES,
    MAX_IMAGES,
    MAX_MASK_BLUR,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_STYLES,
    SIDES,
    TASKS,
    ImageRequest,
)
from loom.image.samplers import SAMPLERS, sampler_names
from loom.image.styles import load_styles
from loom.image.wildcards import list_wildcards
from loom.server.guard import ErrorResponse

MAX_IMAGE_BYTES = 16 * 1024 * 1024
RETRY_AFTER_S = 5


def _known_performance(name: str) -> str:
    get_performance(name)  # ValueError -> 422 naming the known presets
    return name


Performance = Annotated[str, Field(max_length=64), AfterValidator(_known_performance)]
Sampler = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
Task = Literal[TASKS]  # type: ignore[valid-type]
Side = Literal[SIDES]  # type: ignore[valid-type]
ControlType = Literal[CONTROL_TYPES]  # type: ignore[valid-type]
Seed = Field(None, ge=-1, le=MAX_SEED, description="-1 or none: a random seed")


class LoRAField(BaseModel):
    name: str = Field(max_length=128, pattern=f"^(?:{NAME.pattern})$",
                      description="a LoRA in the server's --image-lora-dir")
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)


class QualityFields(BaseModel):
    """Quality controls: Fooocus' sampling tweaks (none given: the performance preset's), LoRAs, the refiner."""

    sharpness: float | None = Field(None, ge=0, le=30, description="0 = off; Fooocus' default 2")
    adaptive_cfg: float | None = Field(None, ge=1, le=30, description="guidance above this is eased in; 30 = off")
    adm_scaler_positive: float | None = Field(None, ge=0.1, le=3, description="SDXL; 1 = off")
    adm_scaler_negative: float | None = Field(None, ge=0.1, le=3, description="SDXL; 1 = off")
    adm_scaler_end: float | None = Field(None, ge=0, le=1, description="SDXL; fraction of sampling, 0 = off")
    loras: list[LoRAField] = Field([], max_length=MAX_LORAS, description="also <lora:NAME:WEIGHT> in the prompt")
    refiner_switch: float | None = Field(None, gt=0, le=1, description="SDXL refiner: fraction of steps on the base "
                                                                       "model (default 0.8 with a refiner; 1 = off)")
    expansion: bool = Field(False, description="expand the prompt with the server's LLM first (same seed, same "
                                               "expansion; the result's revised_prompt shows it)")


class GenerationBody(QualityFields):
    """OpenAI's image request, plus Loom's optional settings."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, max_length=32, description="WxH, e.g. 512x512, or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Seed
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    sampler: Sampler | None = None
    styles: list[str] = Field([], max_length=MAX_STYLES)
    performance: Performance = "Speed"
    aspect_ratio: str | None = Field(None, max_length=32)


class JobBody(QualityFields):
    task: Task = "txt2img"
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = Field([], max_length=MAX_STYLES)
    performance: Performance = "Speed"
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    sampler: Sampler | None = None
    seed: int | None = Seed
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    aspect_ratio: str | None = Field(None, max_length=32)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    denoise: float | None = Field(None, gt=0, le=1)
    image: str | None = Field(None, description="base64 PNG/JPEG (data: URLs accepted)")
    mask: str | None = Field(None, description="base64 mask, white = repaint")
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR)
    outpaint_sides: list[Side] = Field([], max_length=4)
    outpaint_ratio: float = Field(0.3, ge=0.05, le=1.0)
    upscale_factor: Literal[UPSCALE_FACTORS] = 2.0  # type: ignore[valid-type]
    control_type: ControlType = "canny"
    control_weight: float = Field(1.0, ge=0, le=2, description="controlnet: the ControlNet's scale")
    control_stop_at: float = Field(0.5, gt=0, le=1, description="controlnet: acts on this first fraction of steps")
    control_preprocess: bool = Field(True, description="controlnet: false = `image` is the control map already")
    ip_adapter_weight: float = Field(0.6, ge=0, le=2, description="image_prompt: the IP-Adapter's scale")
    ip_adapter_stop_at: float = Field(0.5, gt=0, le=1, description="image_prompt: acts on this first fraction of "
                                                                    "the steps")


class PreprocessBody(BaseModel):
    image: str = Field(description="base64 PNG/JPEG (data: URLs accepted)")
    control_type: ControlType = "canny"
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="with height or aspect_ratio: the map a job of "
                                                                   "that size gets (cropped to it); none: image's size")
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    aspect_ratio: str | None = Field(None, max_length=32)


def decode_image(data: str, field_name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A base64 PNG/JPEG; its size is checked on the header before a single pixel is decoded."""
    if "," in data[:100] and data.startswith("data:"):
        data = data.split(",", 1)[1]
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"{field_name} is over {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller image")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        check_pixels(image.size, max_pixels, field_name)
        image.load()
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{field_name} has more pixels than this server decodes ({max_pixels}); "
                                 "send a smaller image") from None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, SyntaxError):
        raise HTTPException(400, f"{field_name} is not a base64-encoded PNG or JPEG image") from None
    return image


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise HTTPException(400, f"size must look like '512x512', got {size!r}") from None
    return w, h


def job_request(body: JobBody, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRequest:
    """The request of a job body (blocking: decodes its images; call it in a thread)."""
    fields = body.model_dump(exclude={"image", "mask", "guidance_scale"})
    image = decode_image(body.image, "image", max_pixels) if body.image else None
    mask = decode_image(body.mask, "mask", max_pixels) if body.mask else None
    return ImageRequest(**fields, guidance=body.guidance_scale, image=image, mask=mask)


def job_json(job: Job, base: str, preview: bool = False) -> dict:
    data = job.snapshot()
    data["urls"] = [f"{base}v1/images/files/{job.id}/{p.name}" for p in job.files]
    if preview and job.preview_png:
        data["preview"] = base64.b64encode(job.preview_png).decode()
    return data


class DetailError(BaseModel):
    """The image routes' own errors (FastAPI's shape): ``{"detail": "what to change"}``."""

    detail: str


class ValidationErrors(BaseModel):
    """FastAPI's own 422 for a malformed body: ``{"detail": [{"loc", "msg", "type", ...}]}``."""

    detail: list[dict]


IMAGE_RESPONSES: dict[int | str, dict] = {
    422: {"model": ValidationErrors | DetailError,
          "description": "a malformed body (FastAPI's list of errors), or an unknown LoRA (a message)"},
    413: {"model": ErrorResponse | DetailError,
          "description": "body over --max-body-mb (the guard's error), or an image or result over the pixel limit"},
}
"""A 413 comes from the guard (body size) or from the route (pixels): the schema names both shapes."""


def build_router(queue: JobQueue, limits: ImageLimits | None = None) -> APIRouter:
    limits = limits or ImageLimits()
    router = APIRouter(prefix="/v1/images", tags=["images"], responses=IMAGE_RESPONSES)

    def submit(request: ImageRequest) -> Job:
        try:
            limits.apply(request)
            if queue.engine is not None:
                check_pixels(queue.engine.output_size(request), limits.max_pixels, "the result")
        except TooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ValueError as exc:  # over a limit, or an outpaint the model's size unit does not allow
            raise HTTPException(400, str(exc)) from None
        try:
            if queue.engine is not None:
                queue.engine.check(request)
        except UnknownLoRA as exc:
            raise HTTPException(422, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            return queue.submit(request)
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RuntimeError as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no image job {job_id!r}; GET /v1/images/jobs lists them")
        return job

    @router.post("/generations")
    async def generations(body: GenerationBody, http: Request) -> dict:
        width, height = parse_size(body.size)
        try:
            req = ImageRequest(
                prompt=body.prompt, negative_prompt=body.negative_prompt, num_images=body.n, width=width, height=height,
                seed=body.seed, steps=body.steps, guidance=body.guidance_scale, sampler=body.sampler,
                styles=body.styles, performance=body.performance, aspect_ratio=body.aspect_ratio,
                **body.model_dump(include=set(QualityFields.model_fields)),
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        job = submit(req)
        while not job.is_finished:
            await job.changed(job.version, 1.0)
        if job.status != "succeeded":
            raise HTTPException(500 if job.status == "failed" else 409,
                                f"image job {job.id} {job.status}: {job.error or ''}".strip(": "))
        data = await asyncio.to_thread(_generation_data, job, body, str(http.base_url))
        return {"created": int(job.created), "data": data}

    @router.post("/jobs", status_code=202)
    async def submit_job(body: JobBody, http: Request) -> dict:
        try:
            req = await asyncio.to_thread(job_request, body, limits.max_pixels)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return job_json(submit(req), str(http.base_url))

    @router.get("/jobs")
    async def list_jobs(http: Request, status: str | None = None, limit: int = 100) -> dict:
        jobs = [j for j in queue.jobs() if status is None or j.status == status][: max(1, min(limit, 1000))]
        return {"data": [job_json(j, str(http.base_url)) for j in jobs], "queued": queue.queued}

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str, http: Request, preview: bool = False) -> dict:
        return job_json(find(job_id), str(http.base_url), preview)

    @router.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, http: Request) -> StreamingResponse:
        job = find(job_id)
        base = str(http.base_url)

        async def stream():
            version = -1
            while True:
                if job.version != version:
                    version = job.version
                    yield f"data: {json.dumps(job_json(job, base, preview=True))}\n\n"
                    if job.status in FINISHED:
                        yield "data: [DONE]\n\n"
                        return
                if await http.is_disconnected():
                    return
                await job.changed(version, 1.0)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def cancel(job_id: str, http: Request) -> dict:
        find(job_id)
        return job_json(queue.cancel(job_id), str(http.base_url))

    router.add_api_route("/jobs/{job_id}/cancel", cancel, methods=["POST"])
    router.add_api_route("/jobs/{job_id}", cancel, methods=["DELETE"])

    @router.get("/files/{job_id}/{name}")
    async def get_file(job_id: str, name: str) -> FileResponse:
        job = find(job_id)
        match = [p for p in job.files if p.name == name]
        if not match:
            raise HTTPException(404, f"job {job_id} has no file {name!r}; it has {[p.name for p in job.files]}")
        return FileResponse(match[0], media_type="image/png")

    @router.get("/options")
    async def options() -> dict:
        return {
            "styles": sorted(load_styles()), "samplers": sampler_names(), "performances": list(load_performances()),
            "aspect_ratios": ASPECT_RATIOS, "wildcards": list_wildcards(), "max_pixels": limits.max_pixels,
            "tasks": list(TASKS), "model": queue.engine.info(), "loras": queue.engine.loras.names(),
            "controlnets": queue.engine.controls.types(), "time": time.time(),
        }

    @router.post("/control/preprocess")
    async def preprocess(body: PreprocessBody) -> dict:
        """The control map a controlnet job would make of ``image`` (PyraCanny edges or estimated depth)."""
        if queue.engine is None:
            raise HTTPException(503, "the image model is still loading", headers={"Retry-After": str(RETRY_AFTER_S)})

        def run() -> Image.Image:
            image = decode_image(body.image, "image", limits.max_pixels)
            if not (body.width or body.height or body.aspect_ratio):
                return queue.engine.controls.preprocess(body.control_type, image)
            req = ImageRequest(task="controlnet", image=image, control_type=body.control_type, width=body.width,
                               height=body.height, aspect_ratio=body.aspect_ratio)
            size = queue.engine.size_for(req)
            check_pixels(size, limits.max_pixels, "the map")
            return queue.engine.controls.control_map(body.control_type, image, size)

        try:
            control = await asyncio.to_thread(run)
        except TooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        buf = io.BytesIO()
        control.save(buf, format="PNG")
        return {"control_type": body.control_type, "width": control.width, "height": control.height,
                "image": base64.b64encode(buf.getvalue()).decode()}

    return router



def _generation_data(job: Job, body: GenerationBody, base: str) -> list[dict]:
    """OpenAI's ``data`` items (reads and encodes the PNGs: call it in a thread)."""
    data = []
    for path, settings in zip(job.files, job.settings):
        item = {"revised_prompt": settings.get("final_prompt", body.prompt)}
        if body.response_format == "url":
            item["url"] = f"{base}v1/images/files/{job.id}/{path.name}"
        else:
            item["b64_json"] = base64.b64encode(path.read_bytes()).decode()
        data.append(item)
    return data
