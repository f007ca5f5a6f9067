"""The web UI in a real browser: headless Chromium submits a prompt through the UI, which calls the HTTP API."""

from __future__ import annotations

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_ui_generates_an_image_in_headless_chromium(engine, tmp_path):
    from scripts.image_ui_screenshot import generate_in_browser, image_stack

    shot = tmp_path / "ui.png"
    with image_stack(engine, tmp_path / "out") as (api_url, ui_url):
        shown = generate_in_browser(ui_url, "a sneaker", shot, timeout=120)
        import httpx

        history = httpx.get(f"{api_url}/v1/images/jobs").json()["data"]
    assert shown["progress"].startswith("done in") and shown["gallery_images"] >= 1
    assert len(history) == 1 and history[0]["prompt"] == "a sneaker" and history[0]["status"] == "succeeded"
    assert len(history[0]["files"]) == 2  # the UI's default image count
    assert Image.open(shot).size[0] >= 800


def test_expansion_toggle_in_headless_chromium(expanding, expander, tmp_path):
    """The prompt-expansion checkbox end to end: ticked in the browser, the job asks for expansion, the page shows
    the prompts the model used, and they are the expander's for the job's seeds."""
    from scripts.image_ui_screenshot import generate_in_browser, image_stack

    with image_stack(expanding, tmp_path / "out") as (api_url, ui_url):
        shown = generate_in_browser(ui_url, "a sneaker", tmp_path / "ui.png", timeout=120, expansion=True)
        import httpx

        history = httpx.get(f"{api_url}/v1/images/jobs").json()["data"]
    job = history[0]
    assert job["status"] == "succeeded" and all(s["expansion"] is True for s in job["settings"])
    seeds = [s["seed"] for s in job["settings"]]
    expected = expander.expand(["a sneaker"] * len(seeds), seeds)
    assert [s["final_prompt"] for s in job["settings"]] == expected
    assert all(p in shown["final_prompt"] for p in expected) and "Prompts used" in shown["final_prompt"]
