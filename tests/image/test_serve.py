"""The `loom serve` plugin: flags, no component without --image, the single-file error, and the demo model."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loom.image import serve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    serve.add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_plugin_only_builds_a_component_for_image(tmp_path):
    assert serve.create_component(parse([]), CollectorRegistry()) is None
    args = parse(["--image", "demo", "--image-output-dir", str(tmp_path), "--image-ui-port", "0"])
    component = serve.create_component(args, CollectorRegistry())
    assert component.name == "images" and component.extra_servers() == []
    assert component.health()["ready"] is False  # the model loads in start()
    assert component.api_url == "http://127.0.0.1:8000"


def test_single_file_needs_a_config_offline(tmp_path):
    from safetensors.torch import save_file

    from loom.image.models import load_pipeline

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": __import__("torch").zeros(1)}, str(path))
    with pytest.raises(ValueError, match="--model-config"):
        load_pipeline(str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pipeline(str(tmp_path / "missing"))


@pytest.mark.slow
def test_demo_model_draws_the_prompted_garment():
    """The packaged Fashion-MNIST model: 32x32 images, deterministic, and trousers differ from bags."""
    from loom.image.engine import ImageEngine
    from loom.image.request import ImageRequest

    engine = ImageEngine.load("demo", device="cpu")
    assert engine.native == 32 and engine.upscaler is not None
    trousers = engine.generate(ImageRequest(prompt="a pair of trousers", seed=1, steps=15, num_images=2))
    again = engine.generate(ImageRequest(prompt="a pair of trousers", seed=1, steps=15, num_images=2))
    bag = engine.generate(ImageRequest(prompt="a bag", seed=1, steps=15, num_images=2))
    t, b = (np.stack([np.asarray(im.convert("L"), np.float32) for im in r.images]) for r in (trousers, bag))
    assert t.shape == (2, 32, 32)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(trousers.images, again.images))
    # trousers are tall and narrow, bags wide: compare ink in the side columns of the garment area
    assert t[:, 4:28, 4:10].mean() < b[:, 4:28, 4:10].mean()


@pytest.mark.slow
def test_refiner_and_lora_folders_load_from_disk(tmp_path):
    """--image-refiner / --image-lora-dir reach ImageEngine.load, which loads an SDXL refiner folder beside the base."""
    from loom.image.engine import ImageEngine
    from loom.image.request import ImageRequest
    from loom.image.tiny import tiny_sdxl_pipeline, tiny_sdxl_refiner

    base = tiny_sdxl_pipeline(seed=0)
    base.save_pretrained(tmp_path / "base")
    tiny_sdxl_refiner(base).save_pretrained(tmp_path / "refiner")
    (tmp_path / "loras").mkdir()
    args = parse(["--image", str(tmp_path / "base"), "--image-refiner", str(tmp_path / "refiner"),
                  "--image-lora-dir", str(tmp_path / "loras"), "--image-ui-port", "0",
                  "--image-output-dir", str(tmp_path / "out")])
    component = serve.create_component(args, CollectorRegistry())
    assert (component.refiner, component.lora_dir) == (str(tmp_path / "refiner"), str(tmp_path / "loras"))
    engine = ImageEngine.load(component.model, device="cpu", upscaler=None, refiner=component.refiner,
                              lora_dir=component.lora_dir)
    assert engine.refiner.vae is engine.txt2img.vae and engine.info()["has_refiner"] is True
    result = engine.generate(ImageRequest(prompt="x", seed=1, steps=2, width=32, height=32, refiner_switch=0.5))
    assert result.settings[0]["refiner_step"] == 1 and result.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="SDXL refiner"):
        ImageEngine.load(component.model, device="cpu", upscaler=None, refiner=str(tmp_path / "loras"))


def test_expansion_flag_picks_the_served_llm_or_its_own_or_none(tmp_path):
    """--image-expansion-model: auto = the LLM component of the same server (attached by build_components), a name
    = an engine of its own, none = no expansion."""
    import asyncio
    import types

    from loom.image.expansion import PromptExpander

    base = ["--image", "demo", "--image-output-dir", str(tmp_path), "--image-ui-port", "0"]
    llm = types.SimpleNamespace(name="llm", front=object(),
                                config=types.SimpleNamespace(served_model_names=["smollm2"]))

    def expansion(flags, components):
        component = serve.create_component(parse(base + flags), CollectorRegistry())
        component.attach([component, *components])
        return asyncio.run(_on_loop(component._expansion))

    served = expansion([], [llm])
    assert isinstance(served, PromptExpander) and served.name == "smollm2"
    assert expansion([], []) is None  # auto without an LLM in the server
    assert expansion(["--image-expansion-model", "none"], [llm]) is None
    assert expansion(["--image-expansion-model", "smollm2"], [llm]) == "smollm2"  # ImageEngine.load loads it


async def _on_loop(fn):
    return fn()


def test_build_components_attaches_the_llm_to_the_image_component(tmp_path):
    from loom.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "smollm2", "--image", "demo", "--image-output-dir", str(tmp_path),
                              "--image-ui-port", "0"])
    components = cli.build_components(args, CollectorRegistry())
    llm, image = (next(c for c in components if c.name == name) for name in ("llm", "images"))
    assert image.llm is llm
