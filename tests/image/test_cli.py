"""`loom imagine` end to end on a tiny model saved as a diffusers folder, and reproduction from a PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loom.cli import main
from loom.image.metadata import read_settings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from loom.image.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_model(str(path), seed=0)
    return path


def test_imagine_writes_png_with_settings_and_reproduces(model_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["imagine", "a sneaker", "--model", str(model_dir), "--out", str(out), "--seed", "7", "--steps", "3",
                 "--style", "Sharp", "--width", "64", "--height", "48", "--sampler", "Euler a"]) == 0
    settings = read_settings(out)
    assert (settings["seed"], settings["sampler"], settings["styles"]) == (7, "Euler a", ["Sharp"])
    assert Image.open(out).size == (64, 48)
    again = tmp_path / "b.png"
    assert main(["imagine", "--model", str(model_dir), "--from-png", str(out), "--out", str(again)]) == 0
    assert (np.asarray(Image.open(out)) == np.asarray(Image.open(again))).all()
    up = tmp_path / "up.png"
    assert main(["imagine", "x", "--model", str(model_dir), "--task", "upscale", "--image", str(out), "--out", str(up),
                 "--steps", "4"]) == 0
    assert Image.open(up).size == (128, 96)


def test_imagine_errors_say_what_to_do(model_dir, tmp_path, capsys):
    assert main(["imagine", "--model", str(model_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["imagine", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err


def test_offline_tokenizer_has_clips_ids():
    from loom.image.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok("word " * 200, truncation=True).input_ids) == 77


def test_imagine_quality_flags(model_dir, tmp_path, capsys):
    """--upscale-factor 1.5 sizes the result; --lora names are checked against --lora-dir and say what exists."""
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 48), (120, 40, 200)).save(src)
    out = tmp_path / "up.png"
    assert main(["imagine", "x", "--model", str(model_dir), "--task", "upscale", "--image", str(src), "--out", str(out),
                 "--steps", "2", "--upscale-factor", "1.5", "--sharpness", "3"]) == 0
    assert Image.open(out).size == (96, 72) and read_settings(out)["sharpness"] == 3
    (tmp_path / "loras").mkdir()
    assert main(["imagine", "x", "--model", str(model_dir), "--out", str(tmp_path / "x.png"), "--steps", "2",
                 "--lora-dir", str(tmp_path / "loras"), "--lora", "nope:0.5"]) == 2
    assert "unknown LoRA 'nope'" in capsys.readouterr().err
