"""The web UI (Gradio, as Fooocus): a client of Loom's image HTTP API, never of the engine directly.

    python -m loom.image.ui --api http://127.0.0.1:8000 --port 7860
    (``loom serve --image demo`` starts it on 127.0.0.1:7860 beside the API)

Prompt box, a prompt-expansion toggle (when the server has an LLM for it), style picker, performance preset, aspect
ratio, a gallery, an advanced panel (negative prompt, seed, sampler, steps, guidance, image count), a LoRA picker (5
rows of name and weight), a sampling-quality panel (sharpness, adaptive CFG, SDXL ADM scaling), and tabs for Vary /
Inpaint (draw the mask with the brush) / Outpaint / Upscale / Image Prompt (IP-Adapter, shown when the server has
one) / Control (ControlNet, shown when the server has one; a Preview map button shows the preprocessed map). Every
run submits a job to ``POST /v1/images/jobs`` and follows its server-sent events, so the preview and progress bar
update live; Stop cancels the job through the API.

With an API key (``loom serve --api-key``), the UI sends it on every API call and asks for it at login (any user
name, the key as the password), so the UI's port opens nothing the API's key protects.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

TIMEOUT = httpx.Timeout(10.0, read=600.0)


class ApiClient:
    """The few calls the UI makes to the image API."""

    def __init__(self, base_url: str, api_key: str | None = None):
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def options(self) -> dict:
        r = httpx.get(f"{self.base}/v1/images/options", headers=self.headers, timeout=TIMEOUT)
        r.raise_for_status()
        return r.json()

    def submit(self, body: dict) -> dict:
        r = httpx.post(f"{self.base}/v1/images/jobs", json=body, headers=self.headers, timeout=TIMEOUT)
        if r.status_code >= 400:
            raise RuntimeError(_error_text(r))
        return r.json()

    def events(self, job_id: str):
        """Yield job states from the SSE stream until the job finishes."""
        url = f"{self.base}/v1/images/jobs/{job_id}/events"
        with httpx.stream("GET", url, headers=self.headers, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[6:])

    def preprocess(self, image: Image.Image, kind: str, aspect_ratio: str | None = None) -> Image.Image:
        body = {"image": to_b64(image), "control_type": kind, "aspect_ratio": aspect_ratio}
        r = httpx.post(f"{self.base}/v1/images/control/preprocess", json=body, headers=self.headers, timeout=TIMEOUT)
        if r.status_code >= 400:
            raise RuntimeError(_error_text(r))
        return Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB")

    def cancel(self, job_id: str) -> None:
        httpx.post(f"{self.base}/v1/images/jobs/{job_id}/cancel", headers=self.headers, timeout=TIMEOUT)

    def image(self, url: str) -> Image.Image:
        content = httpx.get(url, headers=self.headers, timeout=TIMEOUT).content
        return Image.open(io.BytesIO(content)).convert("RGB")


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("detail") or (body.get("error") or {}).get("message") or body)
    except ValueError:
        return r.text


def enlarged(image: Image.Image, side: int = 256) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest: pixel for pixel) until its longer side reaches ``side``, so a
    small model's map (the demo's 32 px) can be seen."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def to_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mask_from_editor(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(background image, mask) from an ImageEditor value: strokes on any layer become white in the mask."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    alpha = np.zeros((background.height, background.width), np.uint8)
    for layer in value.get("layers") or []:
        a = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        alpha = np.maximum(alpha, a)
    return background, Image.fromarray(((alpha > 0) * 255).astype(np.uint8))


def settings_body(prompt, negative, styles, performance, aspect, num_images, seed, random_seed, sampler, steps,
                  guidance, custom) -> dict:
    # NOTE: inputs inside a never-opened accordion may arrive as None
    body = {"prompt": prompt or "", "negative_prompt": negative or "", "styles": styles or [],
            "performance": performance or "Speed", "aspect_ratio": aspect, "num_images": int(num_images or 1),
            "seed": None if random_seed or seed is None else int(seed)}
    if custom:
        body |= {"sampler": sampler, "steps": int(steps), "guidance_scale": float(guidance)}
    return body


FIXED_INPUTS = 30
"""Inputs of ``run`` before the sampling-quality sliders and the LoRA rows (see ``inputs`` in build_blocks)."""
TWEAKS = ("sharpness", "adaptive_cfg", "adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end")


MAX_LORA_ROWS = 5
NO_LORA = "None"


def lora_fields(*values) -> dict:
    """The LoRA picker's (name, weight) rows as the API's ``loras`` list; rows left at "None" are skipped."""
    pairs = zip(values[0::2], values[1::2])
    return {"loras": [{"name": name, "weight": float(weight)} for name, weight in pairs
                      if name and name != NO_LORA]}


def tweak_fields(custom_tweaks, *values) -> dict:
    """The sampling-quality sliders as API fields, only when the user overrides the preset's values."""
    if not custom_tweaks:
        return {}
    return {name: float(v) for name, v in zip(TWEAKS, values) if v is not None}


def build_blocks(api_url: str, api_key: str | None = None):
    import gradio as gr  # optional: gradio comes with the image extra

    client = ApiClient(api_url, api_key)
    try:
        opts = client.options()
    except httpx.HTTPError:
        opts = {"styles": [], "samplers": ["DPM++ 2M Karras"], "performances": ["Speed"], "aspect_ratios": ["1:1"],
                "model": {}}

    def run(task, job_state, *values):
        """Generator: submit, then stream (preview, progress text, gallery, job id) updates."""
        (prompt, negative, styles, performance, aspect, num_images, seed, random_seed, sampler, steps, guidance, custom,
         vary_image, vary_mode, inpaint_value, outpaint_image, sides, upscale_image, upscale_factor, refiner_switch,
         custom_tweaks, expansion, *task_values) = values[:FIXED_INPUTS]
        tweaks, loras = values[FIXED_INPUTS : FIXED_INPUTS + len(TWEAKS)], values[FIXED_INPUTS + len(TWEAKS) :]
        body = settings_body(prompt, negative, styles, performance, aspect, num_images, seed, random_seed, sampler,
                             steps, guidance, custom) | tweak_fields(custom_tweaks, *tweaks) | lora_fields(*loras)
        if expansion:
            body["expansion"] = True
        if model.get("has_refiner") and refiner_switch is not None:
            body["refiner_switch"] = float(refiner_switch)
        try:
            body |= task_inputs(task, vary_image, vary_mode, inpaint_value, outpaint_image, sides, upscale_image,
                                upscale_factor, *task_values)
            job = client.submit(body)
        except (RuntimeError, ValueError, httpx.HTTPError) as exc:
            yield None, f"**Error:** {exc}", gr.update(), None, gr.update()
            return
        yield None, "queued", gr.update(), job["id"], ""
        for state in client.events(job["id"]):
            preview = Image.open(io.BytesIO(base64.b64decode(state["preview"]))) if state.get("preview") else None
            p = state["progress"]
            text = f"{state['status']}: step {p['step']} / {p['total']}"
            if state["status"] == "succeeded":
                images = [client.image(u) for u in state["urls"]]
                seeds = ", ".join(str(s["seed"]) for s in state["settings"])
                final = "\n\n".join(f"`{s['final_prompt']}`" for s in state["settings"] if "final_prompt" in s)
                yield (preview, f"done in {state['finished'] - state['started']:.1f} s (seeds {seeds})", images, None,
                       f"**Prompt{'s' if len(state['settings']) > 1 else ''} used:**\n\n{final}" if final else "")
                return
            if state["status"] in ("failed", "cancelled"):
                yield preview, f"{state['status']} {state.get('error') or ''}", gr.update(), None, gr.update()
                return
            yield preview, text, gr.update(), job["id"], gr.update()

    def task_inputs(task, vary_image, vary_mode, inpaint_value, outpaint_image, sides, upscale_image,
                    upscale_factor, control_image, control_type, control_weight, control_stop_at,
                    control_preprocess, prompt_image, ip_weight, ip_stop_at) -> dict:
        if task == "txt2img":
            return {"task": "txt2img"}
        if task == "image_prompt":
            _need(prompt_image, "Image Prompt")
            return {"task": "image_prompt", "image": to_b64(prompt_image), "ip_adapter_weight": float(ip_weight),
                    "ip_adapter_stop_at": float(ip_stop_at)}
        if task == "controlnet":
            _need(control_image, "Control")
            return {"task": "controlnet", "image": to_b64(control_image), "control_type": control_type,
                    "control_weight": float(control_weight), "control_stop_at": float(control_stop_at),
                    "control_preprocess": bool(control_preprocess)}
        if task == "vary":
            _need(vary_image, "Vary")
            return {"task": "vary_subtle" if vary_mode == "Subtle" else "vary_strong", "image": to_b64(vary_image)}
        if task == "inpaint":
            image, mask = mask_from_editor(inpaint_value)
            _need(image, "Inpaint")
            if not np.asarray(mask).any():
                raise ValueError("draw the area to repaint on the image with the brush first")
            return {"task": "inpaint", "image": to_b64(image), "mask": to_b64(mask)}
        if task == "outpaint":
            _need(outpaint_image, "Outpaint")
            return {"task": "outpaint", "image": to_b64(outpaint_image),
                    "outpaint_sides": [s.lower() for s in sides or []]}
        _need(upscale_image, "Upscale")
        return {"task": "upscale", "image": to_b64(upscale_image), "upscale_factor": float(upscale_factor.rstrip("x"))}

    def stop(job_id):
        if job_id:
            client.cancel(job_id)
        return "stopping…" if job_id else "nothing running"

    model = opts.get("model", {})
    with gr.Blocks(title="Loom Imagine") as demo:
        gr.Markdown(f"## Loom Imagine — model `{model.get('model', '?')}` ({model.get('native_size', '?')} px native)")
        job_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                preview = gr.Image(label="Preview", type="pil", height=256, elem_id="preview", interactive=False)
                progress = gr.Markdown("idle", elem_id="progress")
                gallery = gr.Gallery(label="Results", columns=4, height=320, elem_id="gallery", format="png")
                final_prompt = gr.Markdown("", elem_id="final-prompt")
                with gr.Row():
                    prompt = gr.Textbox(show_label=False, placeholder="Type a prompt, e.g. a sneaker", lines=2, scale=5,
                                        elem_id="prompt")
                    generate = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
                    stop_btn = gr.Button("Stop", scale=1, elem_id="stop")
                with gr.Tabs():
                    with gr.Tab("Vary", elem_id="tab-vary"):
                        vary_image = gr.Image(type="pil", label="Image to vary")
                        vary_mode = gr.Radio(["Subtle", "Strong"], value="Subtle", label="Vary")
                        vary_btn = gr.Button("Vary", elem_id="tab-vary-run")
                    with gr.Tab("Inpaint", elem_id="tab-inpaint"):
                        inpaint_value = gr.ImageEditor(type="pil", label="Draw the area to repaint",
                                                       brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                        inpaint_btn = gr.Button("Inpaint", elem_id="tab-inpaint-run")
                    with gr.Tab("Outpaint", elem_id="tab-outpaint"):
                        outpaint_image = gr.Image(type="pil", label="Image to extend")
                        sides = gr.CheckboxGroup(["Left", "Right", "Top", "Bottom"], value=["Left", "Right"],
                                                 label="Extend")
                        outpaint_btn = gr.Button("Outpaint", elem_id="tab-outpaint-run")
                    with gr.Tab("Upscale", elem_id="tab-upscale"):
                        upscale_image = gr.Image(type="pil", label="Image to upscale")
                        upscale_factor = gr.Radio(["1.5x", "2x"], value="2x", label="Upscale by")
                        upscale_btn = gr.Button("Upscale", elem_id="tab-upscale-run")
                    with gr.Tab("Image Prompt", elem_id="tab-image-prompt", visible=bool(model.get("has_ip_adapter"))):
                        prompt_image = gr.Image(type="pil", label="Image prompt (IP-Adapter)")
                        ip_weight = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Weight")
                        ip_stop_at = gr.Slider(0.05, 1.0, value=0.5, step=0.05,
                                               label="Stop at (fraction of the steps)")
                        image_prompt_btn = gr.Button("Generate with image prompt", elem_id="tab-image-prompt-run")
                    with gr.Tab("Control", elem_id="tab-control", visible=bool(opts.get("controlnets"))):
                        with gr.Row():
                            control_image = gr.Image(type="pil", label="Control image")
                            control_map = gr.Image(type="pil", label="Control map", interactive=False,
                                                   elem_id="control-map")
                        control_type = gr.Radio(opts.get("controlnets") or ["canny"],
                                                value=(opts.get("controlnets") or ["canny"])[0], label="ControlNet")
                        control_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Weight")
                        control_stop_at = gr.Slider(0.05, 1.0, value=0.5, step=0.05,
                                                    label="Stop at (fraction of the steps)")
                        control_preprocess = gr.Checkbox(value=True, label="Preprocess (PyraCanny edges / depth); "
                                                                           "off: the image is the map")
                        with gr.Row():
                            preview_map_btn = gr.Button("Preview map", elem_id="tab-control-preview")
                            control_btn = gr.Button("Generate with control", elem_id="tab-control-run")
            with gr.Column(scale=2):
                performance = gr.Radio(opts["performances"],
                                       value="Speed" if "Speed" in opts["performances"] else opts["performances"][0],
                                       label="Performance")
                aspect = gr.Radio(opts["aspect_ratios"], value=opts["aspect_ratios"][0], label="Aspect ratio")
                num_images = gr.Slider(1, 8, value=2, step=1, label="Images")
                expansion = gr.Checkbox(value=False, visible=bool(model.get("expansion_model")), elem_id="expansion",
                                        label=f"Prompt expansion (by {model.get('expansion_model')})")
                styles = gr.CheckboxGroup(opts["styles"], value=[], label="Styles", elem_id="styles")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    negative = gr.Textbox(label="Negative prompt", lines=2)
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        random_seed = gr.Checkbox(value=True, label="Random seed")
                    custom = gr.Checkbox(value=False, label="Override the preset's sampler, steps and guidance")
                    sampler = gr.Dropdown(opts["samplers"], value=opts["samplers"][0], label="Sampler")
                    steps = gr.Slider(1, 150, value=30, step=1, label="Steps")
                    guidance = gr.Slider(0.0, 20.0, value=4.0, step=0.5, label="Guidance (CFG)")
                    refiner_switch = gr.Slider(0.05, 1.0, value=0.8, step=0.05, visible=bool(model.get("has_refiner")),
                                               label="Refiner switch (fraction of steps on the base model; 1 = off)")
                with gr.Accordion("LoRAs", open=False, elem_id="loras"):
                    lora_inputs = []
                    for i in range(MAX_LORA_ROWS):
                        with gr.Row():
                            lora_inputs.append(gr.Dropdown([NO_LORA] + opts.get("loras", []), value=NO_LORA,
                                                           label=f"LoRA {i + 1}", elem_id=f"lora-{i}", scale=3))
                            lora_inputs.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Weight",
                                                         elem_id=f"lora-{i}-weight", scale=2))
                with gr.Accordion("Sampling quality", open=False, elem_id="sampling-quality"):
                    custom_tweaks = gr.Checkbox(value=False, label="Override the preset's sharpness, adaptive CFG "
                                                                   "and ADM scaling", elem_id="custom-tweaks")
                    tweak_sliders = [
                        gr.Slider(0.0, 30.0, value=2.0, step=0.5, label="Sharpness (0 = off)", elem_id="sharpness"),
                        gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="Adaptive CFG (30 = off)"),
                        gr.Slider(0.1, 3.0, value=1.5, step=0.1, label="ADM positive scale (SDXL)"),
                        gr.Slider(0.1, 3.0, value=0.8, step=0.1, label="ADM negative scale (SDXL)"),
                        gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="ADM scaling ends at (SDXL)"),
                    ]
        inputs = [job_state, prompt, negative, styles, performance, aspect, num_images, seed, random_seed, sampler,
                  steps, guidance, custom, vary_image, vary_mode, inpaint_value, outpaint_image, sides, upscale_image,
                  upscale_factor, refiner_switch, custom_tweaks, expansion, control_image, control_type, control_weight,
                  control_stop_at, control_preprocess, prompt_image, ip_weight, ip_stop_at, *tweak_sliders,
                  *lora_inputs]
        outputs = [preview, progress, gallery, job_state, final_prompt]
        for button, task in ((generate, "txt2img"), (vary_btn, "vary"), (inpaint_btn, "inpaint"),
                             (outpaint_btn, "outpaint"), (upscale_btn, "upscale"), (control_btn, "controlnet"),
                             (image_prompt_btn, "image_prompt")):
            button.click(lambda *v, _t=task: (yield from run(_t, *v)), inputs=inputs, outputs=outputs)
        prompt.submit(lambda *v: (yield from run("txt2img", *v)), inputs=inputs, outputs=outputs)
        stop_btn.click(stop, inputs=[job_state], outputs=[progress])

        def preview_map(image, kind, aspect):
            if image is None:
                return None, "put an image in the Control tab first"
            try:
                return enlarged(client.preprocess(image, kind, aspect)), "control map ready (at the job's size)"
            except (RuntimeError, httpx.HTTPError) as exc:
                return None, f"**Error:** {exc}"

        preview_map_btn.click(preview_map, inputs=[control_image, control_type, aspect],
                              outputs=[control_map, progress])
    return demo


def _need(image, tab: str) -> None:
    if image is None:
        raise ValueError(f"put an image in the {tab} tab first")


def build_ui_app(api_url: str, api_key: str | None = None):
    """A FastAPI app serving the Gradio UI at / (what `loom serve` runs on --image-ui-port); with a key, a login."""
    import gradio as gr  # optional: gradio comes with the image extra

    auth = None
    if api_key:
        def auth(username: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), api_key.encode())

    return gr.mount_gradio_app(FastAPI(), build_blocks(api_url, api_key), path="/", auth=auth,
                               auth_message="Log in with any user name and the server's API key as the password.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loom's image web UI (a client of the image API)")
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY") or None,
                        help="the API's key (default $LOOM_API_KEY)")
    args = parser.parse_args(argv)
    uvicorn.run(build_ui_app(args.api, args.api_key), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
