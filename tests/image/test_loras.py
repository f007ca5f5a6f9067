"""LoRAs: two adapters at (0.5, 0.8) equal diffusers' own set_adapters; kohya files; per-job switching; names only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from loom.image.cli import parse_lora_flag
from loom.image.loras import LoRASpec, UnknownLoRA, merge_loras, strip_lora_tags
from loom.image.metadata import parameters_line
from loom.image.request import ImageRequest

pytestmark = pytest.mark.slow
RANK = 4
REQ = dict(prompt="a sneaker", seed=5, steps=2, width=32, height=32, guidance=5.0, sampler="Euler")


def random_lora_layers(seed: int, text: bool) -> tuple[dict, dict | None]:
    """peft LoRA layers (random B, so they act) on a tiny UNet and, if asked, its text encoder."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from loom.image.tiny import TinySpec, build_text_encoder, build_unet

    torch.manual_seed(seed)
    unet = build_unet(TinySpec())
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te_layers = None
    if text:
        encoder = build_text_encoder(TinySpec())
        # peft directly: transformers' own add_adapter asks for a newer peft than diffusers needs
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)
        te_layers = get_peft_model_state_dict(encoder)
    return get_peft_model_state_dict(unet), te_layers


def kohya_state_dict(unet_layers: dict, te_layers: dict) -> dict:
    """peft's LoRA keys written the way kohya's sd-scripts name them (lora_unet_* / lora_te_text_model_*,
    .lora_down / .lora_up, .alpha)."""
    out = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_text_model_", te_layers)):
        for key, tensor in layers.items():
            module, kind = key.rsplit(".lora_", 1)
            base = prefix + module.replace(".", "_")
            out[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(RANK))
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("loras")
    for name, seed, text in (("film", 1, True), ("ink", 2, False)):
        unet_layers, te_layers = random_lora_layers(seed, text)
        StableDiffusionPipeline.save_lora_weights(folder / name, unet_lora_layers=unet_layers,
                                                  text_encoder_lora_layers=te_layers)
    unet_layers, te_layers = random_lora_layers(3, True)
    StableDiffusionPipeline.save_lora_weights(folder / "ink3", unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers)
    save_file(kohya_state_dict(unet_layers, te_layers), str(folder / "ink3-kohya.safetensors"))
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def fresh_pipe():
    from loom.image.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_engine(lora_dir):
    from loom.image.engine import ImageEngine

    return ImageEngine(fresh_pipe(), name="tiny", lora_dir=lora_dir)


def pixels(image) -> np.ndarray:
    return np.asarray(image, np.int16)


def reference(lora_dir, adapters: dict[str, float]) -> np.ndarray:
    """diffusers alone: load_lora_weights each folder, set_adapters with the weights, same seed and sampler."""
    from diffusers import EulerDiscreteScheduler

    pipe = fresh_pipe()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for name in adapters:
        pipe.load_lora_weights(str(lora_dir / name), adapter_name=name.replace("-", "_"))
    pipe.set_adapters([n.replace("-", "_") for n in adapters], list(adapters.values()))
    image = pipe("a sneaker", num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                 generator=torch.Generator().manual_seed(5)).images[0]
    return pixels(image)


def test_two_loras_equal_diffusers_set_adapters(lora_engine, lora_dir):
    ours = lora_engine.generate(ImageRequest(**REQ, loras=[{"name": "film", "weight": 0.5},
                                                           {"name": "ink", "weight": 0.8}])).images[0]
    assert np.abs(pixels(ours) - reference(lora_dir, {"film": 0.5, "ink": 0.8})).max() <= 1
    assert np.abs(pixels(ours) - reference(lora_dir, {"film": 0.5, "ink": 0.3})).max() > 1  # weights matter


def test_a_kohya_file_loads_as_its_diffusers_twin(lora_engine):
    """UNet and text-encoder layers in kohya's names: diffusers' loader converts them; same image as the twin."""
    kohya = lora_engine.generate(ImageRequest(**REQ, loras=[{"name": "ink3-kohya", "weight": 0.7}])).images[0]
    adapters = lora_engine.txt2img.get_list_adapters()
    assert lora_engine.loras.adapters["ink3-kohya"] in adapters["text_encoder"] and adapters["unet"]
    twin = lora_engine.generate(ImageRequest(**REQ, loras=[{"name": "ink3", "weight": 0.7}])).images[0]
    base = lora_engine.generate(ImageRequest(**REQ)).images[0]
    assert np.abs(pixels(kohya) - pixels(twin)).max() <= 1
    assert np.abs(pixels(kohya) - pixels(base)).max() > 1


def test_switching_per_job_loads_each_lora_once_and_off_is_the_base_model(lora_engine, lora_dir, monkeypatch):
    from loom.image.engine import ImageEngine

    base = ImageEngine(fresh_pipe(), name="plain").generate(ImageRequest(**REQ)).images[0]
    loads = []
    original = type(lora_engine.txt2img).load_lora_weights
    monkeypatch.setattr(type(lora_engine.txt2img), "load_lora_weights",
                        lambda self, *a, **k: (loads.append(k["adapter_name"]), original(self, *a, **k))[1])
    unet = lora_engine.txt2img.unet
    jobs = ([{"name": "film", "weight": 1.0}], [{"name": "ink", "weight": 0.5}], [],
            [{"name": "film", "weight": 0.2}, {"name": "ink", "weight": 0.2}])
    for loras in jobs:
        lora_engine.generate(ImageRequest(**REQ, loras=loras))
    assert len(loads) == len(set(loads)) <= 2  # film and ink once each (or never: earlier tests loaded them)
    assert {"film", "ink"} <= set(lora_engine.loras.adapters)
    loads.clear()
    for loras in jobs:
        lora_engine.generate(ImageRequest(**REQ, loras=loras))
    off = lora_engine.generate(ImageRequest(**REQ)).images[0]
    assert loads == [] and lora_engine.txt2img.unet is unet
    assert np.array_equal(pixels(off), pixels(base))


def test_prompt_tags_add_loras_and_leave_the_text(lora_engine):
    listed = lora_engine.generate(ImageRequest(**REQ, loras=[{"name": "film", "weight": 0.5},
                                                             {"name": "ink", "weight": 0.8}]))
    tagged = lora_engine.generate(ImageRequest(**(REQ | {"prompt": "a <lora:film:0.5>sneaker<lora:ink:0.8>"})))
    assert np.array_equal(pixels(listed.images[0]), pixels(tagged.images[0]))
    assert tagged.settings[0]["final_prompt"] == "a sneaker"
    assert parameters_line(listed.settings[0]).endswith(", LoRAs: film:0.5 ink:0.8")
    assert merge_loras([LoRASpec("film", 1.0)], "<lora:film:0.3> <lora:ink>") == [LoRASpec("film", 0.3),
                                                                                   LoRASpec("ink", 1.0)]
    assert strip_lora_tags("x <lora:a b:1.5>y") == "x y"
    assert parse_lora_flag("film:0.5") == {"name": "film", "weight": 0.5}
    assert parse_lora_flag("ink") == {"name": "ink", "weight": 1.0}


def test_names_are_checked_and_resolved_inside_the_folder(lora_engine, lora_dir, tmp_path):
    assert lora_engine.loras.names() == ["film", "ink", "ink3", "ink3-kohya"]
    with pytest.raises(UnknownLoRA, match=r"\['film', 'ink', 'ink3', 'ink3-kohya'\]"):
        lora_engine.loras.check([LoRASpec("nope")])
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    (lora_dir / "escape.safetensors").symlink_to(outside)
    try:
        with pytest.raises(UnknownLoRA):
            lora_engine.loras.check([LoRASpec("escape")])
    finally:
        (lora_dir / "escape.safetensors").unlink()
    for bad in ("../ink", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="LoRA name"):
            ImageRequest(prompt="x", loras=[{"name": bad, "weight": 1}])
    with pytest.raises(ValueError, match="at most 5 LoRAs"):
        ImageRequest(prompt="".join(f"<lora:l{i}:0.1>" for i in range(6)))
    with pytest.raises(ValueError, match="within ±4"):
        ImageRequest(prompt="x", loras=[{"name": "ink", "weight": 9}])


def test_loras_through_the_api(lora_engine, tmp_path):
    from loom.image.serve import ImageComponent
    from loom.server.app import build_app

    registry = CollectorRegistry()
    component = ImageComponent("tiny", registry, tmp_path, engine=lora_engine)
    with TestClient(build_app([component], registry)) as client:
        assert client.get("/v1/images/options").json()["loras"] == ["film", "ink", "ink3", "ink3-kohya"]
        r = client.post("/v1/images/jobs", json={"prompt": "x", "loras": [{"name": "nope", "weight": 1}]})
        assert r.status_code == 422 and "film" in r.json()["detail"] and "nope" in r.json()["detail"]
        r = client.post("/v1/images/jobs", json={"prompt": "x <lora:nope:1>"})
        assert r.status_code == 422
        r = client.post("/v1/images/jobs", json={"prompt": "x", "loras": [{"name": "../film", "weight": 1}]})
        assert r.status_code == 422
        body = REQ | {"loras": [{"name": "film", "weight": 0.5}, {"name": "ink", "weight": 0.8}]}
        body["guidance_scale"] = body.pop("guidance")
        job = client.post("/v1/images/jobs", json=body).json()
        events = [json.loads(line[6:]) for line in client.get(f"/v1/images/jobs/{job['id']}/events").text.splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["status"] == "succeeded"
        assert events[-1]["settings"][0]["loras"] == [{"name": "film", "weight": 0.5}, {"name": "ink", "weight": 0.8}]


def test_ui_picker_rows_become_the_api_list():
    from loom.image.ui import lora_fields, tweak_fields

    assert lora_fields("film", 0.5, "None", 1.0, "ink", -0.3) == {"loras": [{"name": "film", "weight": 0.5},
                                                                          {"name": "ink", "weight": -0.3}]}
    assert tweak_fields(False, 2, 7, 1.5, 0.8, 0.3) == {}
    assert tweak_fields(True, 2, 7, 1.5, 0.8, 0.3)["adm_scaler_end"] == 0.3


def test_presets_file_carries_loras_and_tweaks(lora_engine, tmp_path, monkeypatch):
    from loom.image.presets import get_performance

    presets = [{"name": "Film", "steps": 2, "guidance": 5.0, "sampler": "Euler", "sharpness": 3,
                "loras": [{"name": "film", "weight": 0.5}]}]
    (tmp_path / "presets.json").write_text(json.dumps(presets))
    monkeypatch.setenv("LOOM_PRESETS", str(tmp_path / "presets.json"))
    assert get_performance("Film").loras == (LoRASpec("film", 0.5),) and get_performance("Speed").steps == 30
    req = ImageRequest(prompt="a sneaker", seed=5, width=32, height=32, performance="Film",
                       loras=[{"name": "ink", "weight": 0.8}])
    assert req.resolved() == (2, 5.0, "Euler") and req.tweaks().sharpness == 3
    assert req.lora_specs() == [LoRASpec("film", 0.5), LoRASpec("ink", 0.8)]
    explicit = ImageRequest(**REQ, sharpness=3, loras=[{"name": "film", "weight": 0.5}, {"name": "ink", "weight": 0.8}])
    assert np.array_equal(pixels(lora_engine.generate(req).images[0]), pixels(lora_engine.generate(explicit).images[0]))
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "X", "sampler": "Euler b"}]))
    monkeypatch.setenv("LOOM_PRESETS", str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown sampler"):
        get_performance("X")


def test_sdxl_lora_equals_diffusers_set_adapters(tmp_path):
    """SDXL: a UNet LoRA through the engine equals diffusers' own load + set_adapters on the same tiny pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loom.image.engine import ImageEngine
    from loom.image.tiny import tiny_sdxl_pipeline

    donor = tiny_sdxl_pipeline(seed=0).unet
    torch.manual_seed(7)
    donor.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "xl-ink", unet_lora_layers=get_peft_model_state_dict(donor))
    engine = ImageEngine(tiny_sdxl_pipeline(seed=0), name="tiny-xl", lora_dir=tmp_path)
    ours = engine.generate(ImageRequest(**REQ, loras=[{"name": "xl-ink", "weight": 0.6}])).images[0]
    ref = tiny_sdxl_pipeline(seed=0)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(tmp_path / "xl-ink"), adapter_name="ink")
    ref.set_adapters(["ink"], [0.6])
    theirs = ref("a sneaker", num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                 generator=torch.Generator().manual_seed(5)).images[0]
    base = engine.generate(ImageRequest(**REQ)).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert np.abs(pixels(ours) - pixels(base)).max() > 1


def test_a_broken_lora_fails_its_job_and_leaves_the_model_clean(lora_engine, lora_dir):
    before = lora_engine.generate(ImageRequest(**REQ)).images[0]
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    try:
        with pytest.raises(ValueError, match="'broken' could not be loaded"):
            lora_engine.generate(ImageRequest(**REQ, loras=[{"name": "broken", "weight": 1.0}]))
    finally:
        (lora_dir / "broken.safetensors").unlink()
    after = lora_engine.generate(ImageRequest(**REQ)).images[0]
    assert np.array_equal(pixels(before), pixels(after))
