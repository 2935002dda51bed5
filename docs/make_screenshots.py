"""Writes docs/images/playground-*.png: the playground page, one screenshot per tool, driven in
headless Chromium against a server on the shipped model_repository/ (`make screenshots`).

Needs Chromium and chromedriver (apt-get install chromium chromium-driver) and selenium (the
`dev` extra). Inputs are data the models never trained on: a freshly drawn triangle to project,
held-out thin digits for the CycleGAN, a downscaled crop of scikit-image's `chelsea` for the x4
upscaler."""
from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from bench.server import launched_server
from training.data.pairs import load_photo, stroke_domains
from training.data.shapes import render_shape

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
WIDTH = 1280


def thin_digits(path: Path) -> str:
    """Eight held-out thin digits side by side (256 x 32), as the CycleGAN's domain A."""
    thin, _ = stroke_domains("held_out", 32)
    row = np.concatenate([x[0].numpy() for x in thin.x[:8]], axis=1)  # [32, 256] in [-1, 1]
    Image.fromarray(((row + 1) * 127.5).round().astype(np.uint8)).save(path)
    return str(path)


def small_photo(path: Path) -> str:
    """The cat's face from scikit-image's `chelsea`, a held-out photo, at a quarter size (64 x 48)."""
    face = Image.fromarray(load_photo("chelsea")[20:212, 60:316])
    face.resize((64, 48), Image.BICUBIC).save(path)
    return str(path)


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},900", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def open_tool(driver, url: str, model: str, tool: str):
    driver.get("about:blank")
    driver.get(f"{url}/#{model}/{tool}")
    return WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, f'#tools form[data-tool="{tool}"]:not([hidden])'))


def fill(form, name: str, value) -> None:
    field = form.find_element(By.NAME, name)
    field.clear()
    field.send_keys(str(value))


def wait_for_images(driver, root, count: int = 1, timeout: float = 120) -> None:
    """Until `count` answer images have loaded in `root` and every sample in the gallery has; fails on a shown error."""
    def settled(_):
        error = " ".join(e.text for e in root.find_elements(By.CSS_SELECTOR, ".message.error"))
        if error:
            raise RuntimeError(f"the page shows an error: {error}")
        return driver.execute_script("""const [root, count] = arguments, images = [...root.querySelectorAll('img.answer'), ...document.querySelectorAll('#gallery img')];
            return root.querySelectorAll('img.answer').length >= count && images.every(i => i.complete && i.naturalWidth > 0)""", root, count)

    WebDriverWait(driver, timeout).until(settled)


def shoot(driver, name: str) -> None:
    """The whole page, beyond the window's height too (Chromium's DevTools screenshot)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path = OUT / f"playground-{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path.relative_to(ROOT)}")


def run(form) -> None:
    form.find_element(By.CSS_SELECTOR, ".controls button").click()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, launched_server(ROOT / "model_repository") as (_, url):
        scratch = Path(scratch)
        target = scratch / "triangle.png"
        Image.fromarray(render_shape(32, shape=2, hue=0.58, size=0.5, x=0.45, y=0.55, rotation=0.4)).save(target)
        driver = browser()
        try:
            form = open_tool(driver, url, "cdcgan-digits", "generate")
            Select(driver.find_element(By.CSS_SELECTOR, "#common select[name=class]")).select_by_value("7")
            fill(form, "n", 32)
            run(form)
            wait_for_images(driver, form)
            shoot(driver, "generate")

            form = open_tool(driver, url, "stylegan-shapes", "style-mix")
            fill(form, "rows", "1, 2, 3, 4")
            fill(form, "cols", "5, 6, 7, 8, 9")
            Select(form.find_element(By.NAME, "layers")).select_by_visible_text("coarse")
            run(form)
            wait_for_images(driver, form)
            shoot(driver, "style-mix")

            form = open_tool(driver, url, "stylegan-shapes", "interpolate")
            fill(form, "a", 3)
            fill(form, "b", 11)
            run(form)
            wait_for_images(driver, form)
            shoot(driver, "interpolate")

            form = open_tool(driver, url, "stylegan-shapes", "edit")
            run(form)
            wait_for_images(driver, form, count=len(form.find_elements(By.CSS_SELECTOR, ".direction")))
            shoot(driver, "edit")

            form = open_tool(driver, url, "stylegan-shapes", "project")
            form.find_element(By.NAME, "file").send_keys(str(target))
            fill(form, "steps", 200)
            run(form)
            wait_for_images(driver, form, timeout=300)
            shoot(driver, "project")

            form = open_tool(driver, url, "cyclegan-thin2thick", "translate")
            form.find_element(By.NAME, "file").send_keys(thin_digits(scratch / "thin-digits.png"))
            wait_for_images(driver, form)
            shoot(driver, "translate")

            form = open_tool(driver, url, "sr-rrdb-x4", "upscale")
            form.find_element(By.NAME, "file").send_keys(small_photo(scratch / "chelsea.png"))
            wait_for_images(driver, form)
            shoot(driver, "upscale")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
