"""Image prompts (Fooocus' "Image Prompt"): an IP-Adapter the user provides, switched on per job.

    adapter = IPAdapter.load(pipe, "/models/ip-adapter")     # ip-adapter*.safetensors + image_encoder/
    with adapter.active(pipe, weight=0.6, stop_step=15, progress=progress):
        pipe(..., ip_adapter_image=image, callback_on_step_end=progress.callback)

A folder in h94/IP-Adapter's layout: one IP-Adapter weights file (``*.safetensors`` or ``*.bin``; or the file's own
path) and an ``image_encoder/`` folder beside it (``CLIPVisionModelWithProjection``; its ``preprocessor_config.json``
when present, else CLIP's 224-pixel processor). Loaded once with diffusers' own loader (``load_ip_adapter``).

Loading an IP-Adapter replaces the UNet's cross-attention processors and adds an image projection, after which a
UNet call without image embeddings fails. So Loom keeps both sets: the plain processors are put back as soon as the
adapter is loaded, and the IP-Adapter's are switched in only for the duration of an image-prompt job — every other
job runs the very UNet it ran before (tested pixel for pixel). ``weight`` is the adapter's scale; after
``stop_step`` steps the scale drops to 0, so the image prompt shapes the composition and the text the rest
(Fooocus' "stop at": stop_step = max(1, round(stop_at x steps))).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def find_weights(path: str | Path) -> tuple[Path, Path]:
    """(weights file, image_encoder folder) of an IP-Adapter folder or file, or FileNotFoundError saying what lacks."""
    path = Path(path)
    if path.is_file():
        weights, folder = path, path.parent
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if len(files) != 1:
            raise FileNotFoundError(f"IP-Adapter {path}: expected one weights file (*.safetensors or *.bin), found "
                                    f"{len(files)}; name the file itself to choose one")
        weights, folder = files[0], path
    else:
        raise FileNotFoundError(f"IP-Adapter {path} not found: give a folder with the weights and image_encoder/")
    encoder = folder / "image_encoder"
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(f"IP-Adapter {path}: no image_encoder/ folder (CLIPVisionModelWithProjection) "
                                f"beside {weights.name}")
    return weights, encoder


class IPAdapter:
    def __init__(self, unet, ip_state: tuple, plain_state: tuple, name: str):
        self.unet = unet
        self._ip_state = ip_state
        self._plain_state = plain_state
        self.name = name

    @classmethod
    def load(cls, pipe, path: str | Path) -> IPAdapter:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        weights, encoder_dir = find_weights(path)
        unet = pipe.unet
        plain = _state(unet)
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir), dtype=pipe.dtype,
                                                                local_files_only=True).to(pipe.device).eval()
        processor = (CLIPImageProcessor.from_pretrained(str(encoder_dir), local_files_only=True)
                     if (encoder_dir / "preprocessor_config.json").is_file() else CLIPImageProcessor())
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None,
                             local_files_only=True)
        adapter = cls(unet, _state(unet), plain, weights.stem)
        _restore(unet, plain)
        return adapter

    @contextlib.contextmanager
    def active(self, pipe, weight: float, stop_step: int, progress):
        """The IP-Adapter's processors and projection while the block runs, at ``weight`` until ``stop_step`` steps
        are done (``progress``'s step hook), then the plain UNet again."""
        _restore(self.unet, self._ip_state)
        pipe.set_ip_adapter_scale(weight)

        def after_step(done_in_run: int) -> None:
            if done_in_run == stop_step:
                pipe.set_ip_adapter_scale(0.0)

        progress.step_hooks.append(after_step)
        try:
            yield
        finally:
            progress.step_hooks.remove(after_step)
            _restore(self.unet, self._plain_state)


def _state(unet) -> tuple:
    return dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type


def _restore(unet, state: tuple) -> None:
    processors, projection, hid_type = state
    unet.set_attn_processor(dict(processors))
    unet.encoder_hid_proj = projection
    unet.config.encoder_hid_dim_type = hid_type
