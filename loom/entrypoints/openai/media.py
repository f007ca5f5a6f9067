"""Images in chat messages (OpenAI's ``image_url`` parts) read into PIL images, bounded.

    image = load_image("data:image/png;base64,iVBOR...", allowed_local_path=None)

Accepted: ``data:`` URLs with base64 (what the OpenAI client sends for a local file), and ``file://`` URLs only under
``--allowed-local-media-path`` (vLLM's flag; off by default: a request must not read this machine's files). Loom
never fetches ``http(s)://`` URLs: a server that fetches what a request names can be pointed at the network behind it.
Decoded with Pillow, restricted to common formats, after the header's size is checked (no decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Largest encoded image (OpenAI's own limit for an image input)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest decoded image; the models' processors resize to a few hundred pixels a side anyway."""
MAX_ASPECT = 8
"""Longest side over shortest: CLIP's processor scales the short side to its size first, so a 16384 x 1 image would
become a 5.5 M x 336 intermediate (gigabytes) before its center crop."""
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Pillow decoders a request may reach (not every format Pillow opens: fewer decoders, less attack surface)."""


_LOOPS_OVER_CONTENT = re.compile(r"\bin\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content)\s*(?:\||-?%\})")
"""A template that iterates over a message's content (``for part in message['content']``, ``... | selectattr``)."""


class MediaError(ValueError):
    """An image a request names that cannot be used (HTTP 400 naming the field)."""


def load_image(url: str, allowed_local_path: str | Path | None = None):
    """The image at ``url`` (a data: URL, or a file:// URL under ``allowed_local_path``) as an RGB PIL image."""
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url))
    if url.startswith("file://"):
        return decode_image(_local_bytes(url, allowed_local_path))
    if url.startswith(("http://", "https://")):
        raise MediaError("Loom does not fetch images from the network: send the image inline as a data: URL "
                         "(data:image/png;base64,...)")
    raise MediaError(f"image_url must be a data: URL (data:image/png;base64,...) or a file:// URL, got "
                     f"{url[:40]!r}")


def decode_image(data: bytes):
    """Encoded image bytes -> an RGB PIL image; MediaError for anything else, or past the size limits."""
    from PIL import Image  # local: Pillow only for vision requests

    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"the image is {len(data)} bytes, more than the limit of {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise MediaError(f"the image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                             "pixels; downscale it")
        if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
            raise MediaError(f"the image is {width}x{height} pixels: sides more than {MAX_ASPECT}:1 apart; crop it")
        image.load()
        return image.convert("RGB")
    except MediaError:
        raise
    except Exception as exc:  # a broken file raises what its decoder raises (OSError, SyntaxError, ValueError, ...)
        raise MediaError(f"the image could not be decoded as {', '.join(FORMATS)} ({type(exc).__name__}: {exc})"
                         ) from None


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("a data: URL image must be base64: data:image/png;base64,...")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise MediaError(f"the image is more than {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL is not valid base64") from None


def _local_bytes(url: str, allowed: str | Path | None) -> bytes:
    """The file a ``file://`` URL names (percent-decoded; no host but localhost; absolute), if it lies under
    ``allowed`` once symlinks are resolved. The resolved path is opened with O_NOFOLLOW (a link put in the file's place
    after the check is not followed) and must be a regular file."""
    if allowed is None:
        raise MediaError("file:// images are off: start the server with --allowed-local-media-path DIR to serve "
                         "images from DIR, or send the image as a data: URL")
    parts = urlparse(url)
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise MediaError("a file:// image URL names an absolute path on this machine: file:///path/to/image.png")
    try:
        root = Path(allowed).resolve()
        target = Path(path).resolve()
        if not target.is_relative_to(root):
            raise MediaError(f"file:// images must be under {root} (--allowed-local-media-path)")
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"no image file at {target}")
            if info.st_size > MAX_IMAGE_BYTES:
                raise MediaError(f"the image is more than {MAX_IMAGE_BYTES} bytes")
            return f.read(MAX_IMAGE_BYTES + 1)
    except MediaError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # missing, unreadable, a name too long, a symlink loop
        raise MediaError(f"the image file could not be read ({type(exc).__name__})") from None


def content_format(template: str) -> str:
    """"openai" for a chat template that loops over a message's content parts (llava-hf's), else "string" (vLLM's
    ``--chat-template-content-format`` auto-detection, by the template's text)."""
    return "openai" if _LOOPS_OVER_CONTENT.search(template or "") else "string"


def vision_content(messages: list[dict], fmt: str, image_text: str) -> list[dict]:
    """Messages for a vision model's template: with "openai", every content a list of ``{"type": "text"}`` /
    ``{"type": "image"}`` parts (a plain string too, which such templates would not render); with "string", a content
    with images becomes text, one ``image_text`` placeholder line per image before the text (vLLM's layout)."""
    out = []
    for m in messages:
        content = m.get("content")
        if fmt == "openai" and isinstance(content, str):
            m = {**m, "content": [{"type": "text", "text": content}] if content else []}
        elif fmt == "string" and isinstance(content, list):
            images = sum(part["type"] == "image" for part in content)
            text = "".join(part["text"] for part in content if part["type"] == "text")
            m = {**m, "content": f"{image_text}\n" * images + text}
        out.append(m)
    return out
