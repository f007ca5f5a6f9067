"""Pure parts: styles, wildcards, presets, outpaint geometry, tiles, request validation, metadata round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loom.image import imageops
from loom.image.metadata import png_bytes, read_settings
from loom.image.presets import aspect_ratio_size, get_performance
from loom.image.request import ImageRequest
from loom.image.styles import apply_styles, load_styles
from loom.image.wildcards import expand_wildcards, list_wildcards


def test_styles_combine_in_order():
    positive, negative = apply_styles("a dress", ["Photograph", "Sharp"], "ugly")
    photo, sharp = load_styles()["Photograph"], load_styles()["Sharp"]
    assert positive == sharp.prompt.replace("{prompt}", photo.prompt.replace("{prompt}", "a dress"))
    assert negative == ", ".join(["ugly", photo.negative_prompt, sharp.negative_prompt])
    with pytest.raises(ValueError, match="unknown style"):
        apply_styles("x", ["Nope"])
    assert len(load_styles()) >= 20


def test_user_styles_file(tmp_path, monkeypatch):
    path = tmp_path / "mine.json"
    path.write_text('[{"name": "Mine", "prompt": "my {prompt}", "negative_prompt": "bad"}]')
    monkeypatch.setenv("LOOM_STYLES", str(path))
    assert apply_styles("cat", ["Mine"]) == ("my cat", "bad")
    path.write_text('[{"name": "Broken", "prompt": "no placeholder"}]')
    monkeypatch.setenv("LOOM_STYLES", str(path) + "x")
    with pytest.raises(FileNotFoundError):
        load_styles()


def test_wildcards_are_seeded(tmp_path, monkeypatch):
    (tmp_path / "animal.txt").write_text("cat\ndog\n# a comment\n\nfox\n")
    monkeypatch.setenv("LOOM_WILDCARDS", str(tmp_path))
    outs = {expand_wildcards("a __animal__ in __season__", seed=s) for s in range(40)}
    assert expand_wildcards("a __animal__", 3) == expand_wildcards("a __animal__", 3)
    assert {o.split()[1] for o in outs} == {"cat", "dog", "fox"}
    assert "animal" in list_wildcards() and "color" in list_wildcards()
    with pytest.raises(ValueError, match="unknown wildcard"):
        expand_wildcards("__nothing_here__", 0)


def test_presets_and_aspect_ratios():
    assert [get_performance(n).steps for n in ("Quality", "Speed", "Extreme Speed")] == [60, 30, 8]
    assert get_performance("Extreme Speed").sampler == "LCM"
    assert aspect_ratio_size("1:1", 512, 64) == (512, 512)
    w, h = aspect_ratio_size("16:9", 1024, 64)
    assert w % 64 == 0 and h % 64 == 0 and abs(w / h - 16 / 9) < 0.1 and abs(w * h / 1024**2 - 1) < 0.1
    with pytest.raises(ValueError, match="16:9"):
        aspect_ratio_size("wide", 512, 8)


def test_outpaint_geometry():
    pad = imageops.outpaint_padding((64, 48), ["left", "top"], 0.3, 8)
    assert (64 + pad.left) % 8 == 0 and (48 + pad.top) % 8 == 0 and pad.right == pad.bottom == 0
    assert pad.left >= 19 and pad.top >= 14
    hard, blend = imageops.outpaint_masks((64 + pad.left, 48 + pad.top), pad, ramp=6)
    h, b = np.asarray(hard), np.asarray(blend)
    assert (h[pad.top :, pad.left :] == 0).all() and (b[pad.top :, pad.left :] == 0).all()
    assert (h[: pad.top] == 255).all() and b[0, 0] == 255 and 0 < b[pad.top - 3, pad.left + 5] < 255
    with pytest.raises(ValueError, match="not a multiple"):
        imageops.outpaint_padding((60, 48), ["top"], 0.3, 8)


def test_tiles_cover_with_overlap_and_blend_exactly():
    assert imageops.tile_starts(64, 64, 16) == [0]
    starts = imageops.tile_starts(200, 64, 16)
    assert starts[0] == 0 and starts[-1] == 200 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(starts, starts[1:]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8))
    tiles = [(x, y, image.crop((x, y, x + 64, y + 64)))
             for y in imageops.tile_starts(100, 64, 16) for x in imageops.tile_starts(120, 64, 16)]
    assert (np.asarray(imageops.blend_tiles(image.size, tiles, 16)) == np.asarray(image)).all()


def test_request_validation_messages():
    for kwargs, message in [({"task": "x"}, "task must be"), ({"steps": 0}, "steps"), ({"num_images": 9}, "num_images"),
                            ({"task": "upscale"}, "needs an input image"), ({"width": 5}, "width"),
                            ({"task": "outpaint", "image": Image.new("RGB", (8, 8))}, "outpaint_sides"),
                            ({"performance": "Fast"}, "performance")]:
        with pytest.raises(ValueError, match=message):
            ImageRequest(prompt="x", **kwargs)
    assert ImageRequest(prompt="x", seed=-1).seed >= 0


def test_metadata_round_trip():
    settings = {"prompt": "a sneaker", "seed": 3, "steps": 4, "sampler": "UniPC", "guidance": 4.0, "width": 8,
                "height": 8}
    data = png_bytes(Image.new("RGB", (8, 8)), settings)
    assert read_settings(data) == settings
    with pytest.raises(ValueError, match="no Loom settings"):
        read_settings(Image.new("RGB", (8, 8)))
