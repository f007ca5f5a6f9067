"""Drive the web UI in headless Chromium (Debian ``chromium`` + ``chromium-driver``, via Selenium) and screenshot it.

    python scripts/image_ui_screenshot.py --model demo --prompt "an ankle boot" --out docs/images-ui.png
    python scripts/image_ui_screenshot.py --model demo --expansion --out docs/images-ui-expansion.png

Starts the image API and the UI in this process on free loopback ports, types the prompt, clicks Generate, waits
for the gallery to show the images, saves a screenshot, and shuts everything down. The test suite uses the same
helpers with a tiny random model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from loom.bench.process import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000"]


@contextlib.contextmanager
def serving(app):
    """Run an ASGI app on a free loopback port in a thread (lifespan included) until the block exits; yields its URL."""
    server = serve_in_thread(app, timeout=60)
    try:
        yield server.url
    finally:
        server.stop(timeout=30)


@contextlib.contextmanager
def image_stack(engine, output_dir: str | Path):
    """The image API (with ``engine``) and the web UI, both on loopback; yields (api_url, ui_url)."""
    from prometheus_client import CollectorRegistry

    from loom.image.serve import ImageComponent
    from loom.image.ui import build_ui_app
    from loom.server.app import build_app

    registry = CollectorRegistry()
    component = ImageComponent(engine.name, registry, Path(output_dir), engine=engine)
    with serving(build_app([component], registry)) as api_url:
        with serving(build_ui_app(api_url)) as ui_url:
            yield api_url, ui_url


def chromium_driver():
    from selenium import webdriver

    os.environ.setdefault("SE_AVOID_STATS", "true")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise FileNotFoundError("headless Chromium is missing: apt-get install chromium chromium-driver "
                                "(or: make image-deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def generate_in_browser(ui_url: str, prompt: str, out: str | Path, timeout: float = 180.0,
                        styles: list[str] = (), expansion: bool = False) -> dict:
    """Type ``prompt`` (tick prompt expansion when asked), click Generate, wait for the gallery, save a screenshot;
    returns what the page showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(ui_url)
        wait = WebDriverWait(driver, timeout)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        for style in styles:
            driver.find_element(By.XPATH, f"//*[@id='styles']//label[.//span[normalize-space()='{style}']]").click()
        if expansion:
            driver.find_element(By.CSS_SELECTOR, "#expansion input[type=checkbox]").click()
        box.send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "done in" in d.find_element(By.CSS_SELECTOR, "#progress").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))
        time.sleep(0.5)  # let the gallery images paint
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        images = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
        return {"progress": driver.find_element(By.CSS_SELECTOR, "#progress").text, "gallery_images": len(images),
                "first_src": images[0].get_attribute("src"),
                "final_prompt": driver.find_element(By.CSS_SELECTOR, "#final-prompt").text}
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from loom.image.engine import ImageEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt", default="an ankle boot")
    parser.add_argument("--style", action="append", default=[])
    parser.add_argument("--expansion", action="store_true", help="tick prompt expansion (by --expansion-model)")
    parser.add_argument("--expansion-model", default="smollm2")
    parser.add_argument("--out", default="docs/images-ui.png")
    args = parser.parse_args(argv)
    engine = ImageEngine.load(args.model, expansion=args.expansion_model if args.expansion else None)
    with tempfile.TemporaryDirectory() as tmp, image_stack(engine, tmp) as (_, ui_url):
        shown = generate_in_browser(ui_url, args.prompt, args.out, styles=args.style, expansion=args.expansion)
    print(f"screenshot {args.out}: {shown['progress']}, {shown['gallery_images']} image(s) in the gallery")
    if args.expansion:
        print(shown["final_prompt"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
