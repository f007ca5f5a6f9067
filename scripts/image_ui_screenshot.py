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
                        styles: list[str] = (), expansion: bool = False, open_panels: list[str] = (),
                        tab: str | None = None, tab_image: str | None = None, crop: str | None = None,
                        before_run=None) -> dict:
    """Type ``prompt`` (tick prompt expansion when asked), open accordions by element id (``open_panels``), and run
    the job: Generate, or the run button of the tab with id ``tab`` (e.g. ``tab-upscale``) after uploading
    ``tab_image`` there; wait for the gallery and save a screenshot of the page, or of the element with id ``crop``.
    ``before_run(driver)`` may set further controls. Returns what the page showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(ui_url)
        wait = WebDriverWait(driver, timeout)

        def clickable(selector: str, by: str = By.CSS_SELECTOR):
            # NOTE: Gradio mounts the page's components one after another, so on a busy machine the prompt box can be
            # there while a control further down is not yet; wait for each element the run touches
            return wait.until(expected_conditions.element_to_be_clickable((by, selector)))

        box = clickable("#prompt textarea")
        for style in styles:
            clickable(f"//*[@id='styles']//label[.//span[normalize-space()='{style}']]", By.XPATH).click()
        if expansion:
            clickable("#expansion input[type=checkbox]").click()
        for panel in open_panels:
            header = wait.until(expected_conditions.presence_of_element_located(
                (By.CSS_SELECTOR, f"#{panel} > button.label-wrap")))
            driver.execute_script("arguments[0].scrollIntoView()", header)
            header.click()
        box.send_keys(prompt)
        run = "#generate"
        if tab is not None:
            clickable(f"#{tab}-button").click()  # Gradio names a tab's button so
            if tab_image is not None:
                upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{tab} input[type=file]"))
                upload.send_keys(str(Path(tab_image).resolve()))
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{tab} img"))
            run = f"#{tab}-run"
        if before_run is not None:
            before_run(driver)
        clickable(run).click()
        wait.until(lambda d: "done in" in d.find_element(By.CSS_SELECTOR, "#progress").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))
        # NOTE: the prompts used arrive in the same update as "done in", but the page may paint them a moment later
        wait.until(lambda d: "Prompt" in d.find_element(By.CSS_SELECTOR, "#final-prompt").text)
        time.sleep(0.5)  # let the gallery images paint
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if crop is None:
            driver.save_screenshot(str(out))
        else:
            element = driver.find_element(By.CSS_SELECTOR, f"#{crop}")
            driver.execute_script("arguments[0].scrollIntoView()", element)
            time.sleep(0.5)
            element.screenshot(str(out))
        images = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
        return {"progress": driver.find_element(By.CSS_SELECTOR, "#progress").text, "gallery_images": len(images),
                "first_src": images[0].get_attribute("src"),
                "final_prompt": driver.find_element(By.CSS_SELECTOR, "#final-prompt").text}
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from loom.image.engine import ImageEngine
    from loom.image.serve import parse_controlnets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt", default="an ankle boot")
    parser.add_argument("--style", action="append", default=[])
    parser.add_argument("--expansion", action="store_true", help="tick prompt expansion (by --expansion-model)")
    parser.add_argument("--expansion-model", default="smollm2")
    parser.add_argument("--open", action="append", default=[], metavar="ID",
                        help="open this accordion first (advanced, loras, sampling-quality; repeatable)")
    parser.add_argument("--tab", default=None, metavar="ID", help="run this tab's job (tab-vary, tab-upscale, ...)")
    parser.add_argument("--tab-image", default=None, help="the image to upload into --tab")
    parser.add_argument("--performance", default=None, help="click this performance preset")
    parser.add_argument("--lora-dir", default=None, help="the LoRA folder the server offers")
    parser.add_argument("--ip-adapter", default=None, metavar="DIR", help="an IP-Adapter the server offers")
    parser.add_argument("--controlnet", action="append", default=[], metavar="TYPE=DIR",
                        help="a ControlNet the server offers (repeatable)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME",
                        help="pick this LoRA in the next row of the LoRA panel (repeatable)")
    parser.add_argument("--click", action="append", default=[], metavar="ID",
                        help="click this button before the job runs (e.g. tab-control-preview; repeatable)")
    parser.add_argument("--crop", default=None, metavar="ID", help="screenshot only this element")
    parser.add_argument("--out", default="docs/images-ui.png")
    args = parser.parse_args(argv)
    engine = ImageEngine.load(args.model, expansion=args.expansion_model if args.expansion else None,
                              lora_dir=args.lora_dir, controlnets=parse_controlnets(args.controlnet, "--controlnet"),
                              ip_adapter=args.ip_adapter)

    def before_run(driver):
        from selenium.webdriver.common.by import By

        if args.performance:
            driver.find_element(By.XPATH, f"//label[.//span[normalize-space()='{args.performance}']]").click()
        for button in args.click:
            driver.find_element(By.CSS_SELECTOR, f"#{button}").click()
            time.sleep(2.0)  # let its result arrive
        for row, name in enumerate(args.lora):
            from selenium.webdriver.common.keys import Keys

            box = driver.find_element(By.CSS_SELECTOR, f"#lora-{row} input")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(name)
            time.sleep(0.3)
            box.send_keys(Keys.ENTER)

    with tempfile.TemporaryDirectory() as tmp, image_stack(engine, tmp) as (_, ui_url):
        shown = generate_in_browser(ui_url, args.prompt, args.out, styles=args.style, expansion=args.expansion,
                                    open_panels=args.open, tab=args.tab, tab_image=args.tab_image, crop=args.crop,
                                    before_run=before_run)
    print(f"screenshot {args.out}: {shown['progress']}, {shown['gallery_images']} image(s) in the gallery")
    if args.expansion:
        print(shown["final_prompt"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
