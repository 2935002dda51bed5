"""The playground page in a real browser (headless Chromium through Selenium) against the real
server: the gallery lists every model with its samples, and each tool, used once, shows its answer
at the expected size with the request's latency, or the API's own error message."""
from __future__ import annotations

import shutil

import httpx
import pytest
from PIL import Image

from tests.serving import running_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser tests need Chromium and chromedriver (apt-get install chromium chromium-driver); .ci/run installs them",
                allow_module_level=True)

GRID_PADDING = 2  # service/imaging.py grid(): between and around the images
SERVER_WAIT_S = 30


def grid_width(columns: int, size: int) -> int:
    return columns * (size + GRID_PADDING) + GRID_PADDING


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_script_errors(browser):
    """After each test: the page threw nothing (failed resources, the API's 4xx answers, are expected)."""
    browser.get_log("browser")
    yield
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not errors


def png(path, width: int, height: int, colour=(200, 40, 90)):
    Image.new("RGB", (width, height), colour).save(path)
    return str(path)


def open_tool(browser, server, model: str, tool: str):
    """A fresh page with `model` chosen and `tool` open (the page's own #model/tool links)."""
    browser.get("about:blank")  # else a new hash on the same page would keep the last test's state
    browser.get(f"{server.url}/#{model}/{tool}")
    return WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, f'#tools form[data-tool="{tool}"]:not([hidden])'))


def fill(form, name: str, value) -> None:
    field = form.find_element(By.NAME, name)
    field.clear()
    field.send_keys(str(value))


def wait_for_answer(browser, root, selector: str = "img.answer", count: int = 1) -> list:
    """The loaded images of `root` matching `selector` (at least `count`); fails with the page's
    error message if one is shown instead."""
    def settled(_):
        errors = [e.text for e in root.find_elements(By.CSS_SELECTOR, ".message.error") if e.text]
        if errors:
            return errors
        images = root.find_elements(By.CSS_SELECTOR, selector)
        loaded = browser.execute_script("return arguments[0].every(i => i.complete && i.naturalWidth > 0)", images)
        return images if len(images) >= count and loaded else None

    try:
        found = WebDriverWait(browser, SERVER_WAIT_S).until(settled)
    except TimeoutException:
        raise AssertionError(f"no answer in {SERVER_WAIT_S} s: {root.text!r}") from None
    if isinstance(found[0], str):
        raise AssertionError(f"the page shows an error: {found}")
    return found


def natural_width(browser, image) -> int:
    return browser.execute_script("return arguments[0].naturalWidth", image)


def timing_of(root) -> str:
    return root.find_element(By.CSS_SELECTOR, ".timing").text


def shown_error(browser, root) -> str:
    return WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: root.find_element(By.CSS_SELECTOR, ".message.error").text)


def api_message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


@pytest.mark.parametrize("page,operation", [("/docs", ".opblock"), ("/redoc", "[data-section-id^='operation']")])
def test_the_api_docs_render_their_operations_from_scripts_the_server_serves(browser, server, page, operation):
    """...and fetch nothing from elsewhere: ReDoc's bundle asked cdn.redoc.ly for its logo (the
    page's address in its Referer), which the page's policy now has the browser refuse."""
    browser.get_log("browser")  # (what earlier pages logged)
    browser.get(server.url + page)
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, operation)) > 10)
    assert "/v1/models/{name}/generate" in browser.find_element(By.TAG_NAME, "body").text
    if page == "/redoc":  # (its logo is asked for once the page has rendered: its refusal, or its failure offline, is logged)
        elsewhere: list[str] = []
        WebDriverWait(browser, SERVER_WAIT_S).until(
            lambda _: elsewhere.extend(e["message"] for e in browser.get_log("browser") if "redoc.ly" in e["message"]) or elsewhere)
        assert all("Content Security Policy" in message for message in elsewhere), elsewhere


@pytest.mark.parametrize("page,shown", [("/", "#gallery"), ("/docs", ".swagger-ui"), ("/redoc", "redoc, [data-section-id]")])
def test_another_sites_page_cannot_frame_the_playground_or_the_docs(browser, server, tmp_path, page, shown):
    """A probe's page framed /docs at one operation: a click on "Try it out", a typed model name
    and a click on Execute unloaded the model, the request being the docs page's own (so no
    Origin or Host check could tell). The pages now tell the browser that no other site may frame
    them, and it shows an error in the frame instead. Their files say it too, and `nosniff`."""
    elsewhere = tmp_path / "elsewhere.html"
    elsewhere.write_text(f'<iframe id="framed" src="{server.url}{page}" width="900" height="700"></iframe>')
    browser.get(elsewhere.as_uri())
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: browser.execute_script("return document.readyState") == "complete")
    browser.switch_to.frame("framed")
    try:
        with pytest.raises(TimeoutException):  # what the page shows when it is allowed to load
            WebDriverWait(browser, 3).until(lambda _: browser.find_elements(By.CSS_SELECTOR, shown))
    finally:
        browser.switch_to.default_content()
    browser.get_log("browser")  # (the browser logs its refusal to show the frame as an error: expected here)
    for path in (page, "/static/playground.js", "/docs-assets/swagger-ui-bundle.js"):
        headers = httpx.get(server.url + path, timeout=30).headers
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff", path


def test_the_page_is_served_at_the_root_only(server):
    """Its links are relative to the root (static/playground.js): a second copy under /static
    loaded neither its script nor its style (a probe found it)."""
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and '<script src="static/playground.js"' in page.text
    assert httpx.get(server.url + "/static/playground.html", timeout=30).status_code == 404
    assert httpx.get(server.url + "/static/playground.js", timeout=30).status_code == 200


def test_gallery_lists_every_model_with_its_facts_and_samples(browser, server):
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    browser.get(server.url + "/")
    cards = WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))
    assert [c.get_attribute("data-model") for c in cards] == [m["name"] for m in models]
    assert {m["name"] for m in models} == {"digits", "cdigits", "styles", "edges", "gray", "upx4"}
    samples = wait_for_answer(browser, browser.find_element(By.ID, "gallery"), ".card img", count=len(models))
    assert len(samples) == len(models)  # every card shows its samples.png
    text = {c.get_attribute("data-model"): c.text for c in cards}
    assert "style generator" in text["styles"] and "16 px" in text["styles"] and "v1" in text["styles"]
    assert "×4 upscale" in text["upx4"] and "image translation" in text["edges"]
    runtime = models[0]
    assert f"{runtime['runtime']} on {runtime['device']}" in text[runtime["name"]]

    next(c for c in cards if c.get_attribute("data-model") == "styles").click()
    tabs = WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tabs button"))
    assert [t.text for t in tabs] == ["generate", "style mixing", "interpolation", "edit", "projection"]
    assert browser.find_element(By.CSS_SELECTOR, "[data-needs=psi]").is_displayed()  # the truncation slider of style models
    assert not browser.find_element(By.CSS_SELECTOR, "[data-needs=classes]").is_displayed()


def test_generate_shows_the_grid_and_its_latency(browser, server):
    form = open_tool(browser, server, "digits", "generate")
    fill(form, "seed", 3)
    fill(form, "n", 4)
    form.find_element(By.CSS_SELECTOR, "button").click()
    (image,) = wait_for_answer(browser, form)
    assert natural_width(browser, image) == grid_width(4, 32)
    assert timing_of(form).startswith("latency ") and " ms" in timing_of(form)
    assert "server: queue" in timing_of(form) and "compute" in timing_of(form) and "encode" in timing_of(form)  # from Server-Timing


def test_conditional_model_draws_the_class_picked(browser, server):
    form = open_tool(browser, server, "cdigits", "generate")
    picker = Select(browser.find_element(By.CSS_SELECTOR, "#common select[name=class]"))
    assert len(picker.options) == 1 + 10  # "by seed" and the ten digits
    picker.select_by_value("7")
    fill(form, "n", 1)
    form.find_element(By.CSS_SELECTOR, "button").click()
    (image,) = wait_for_answer(browser, form)
    assert natural_width(browser, image) == 32
    shown = browser.execute_script("return fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => Array.from(new Uint8Array(b)))", image)
    expected = httpx.post(f"{server.url}/v1/models/cdigits/generate", json={"seed": 0, "n": 1, "class": 7}).content
    assert bytes(shown) == expected


def test_an_api_error_is_shown_as_the_apis_message(browser, server):
    form = open_tool(browser, server, "digits", "generate")
    fill(form, "n", 0)
    form.find_element(By.CSS_SELECTOR, "button").click()
    expected = api_message(httpx.post(f"{server.url}/v1/models/digits/generate", json={"seed": 0, "n": 0, "columns": 1}))
    assert expected in shown_error(browser, form)


def test_a_seed_past_what_a_browsers_numbers_hold_is_refused_not_rounded(browser, server):
    """2^60 + 1 was sent as 2^60 (the browser's Number rounds past 2^53): another seed's image."""
    form = open_tool(browser, server, "digits", "generate")
    fill(form, "seed", 2**60 + 1)
    form.find_element(By.CSS_SELECTOR, "button").click()
    assert "past 2^53" in shown_error(browser, form)


def test_style_mixing_grid(browser, server):
    form = open_tool(browser, server, "styles", "style-mix")
    fill(form, "rows", "1, 2")
    fill(form, "cols", "3, 4, 5")
    Select(form.find_element(By.NAME, "layers")).select_by_visible_text("coarse")
    form.find_element(By.CSS_SELECTOR, "button").click()
    (image,) = wait_for_answer(browser, form)
    assert natural_width(browser, image) == grid_width(3, 16)
    assert browser.execute_script("return arguments[0].naturalHeight", image) == grid_width(2, 16)
    columns, rows = wait_for_answer(browser, form, "img.source", count=2)  # the sources: column seeds above, row seeds beside
    assert natural_width(browser, columns) == grid_width(3, 16) and natural_width(browser, rows) == grid_width(1, 16)
    assert timing_of(form).startswith("latency ")


def test_interpolation_is_an_animation(browser, server):
    form = open_tool(browser, server, "styles", "interpolate")
    fill(form, "steps", 6)
    form.find_element(By.CSS_SELECTOR, "button").click()
    (image,) = wait_for_answer(browser, form)
    assert natural_width(browser, image) == 16
    header = browser.execute_script("return fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => String.fromCharCode(...new Uint8Array(b).slice(0, 6)))", image)
    assert header == "GIF89a"
    assert timing_of(form).startswith("latency ")


def test_edit_strip_per_direction(browser, server):
    form = open_tool(browser, server, "styles", "edit")
    strips = form.find_elements(By.CSS_SELECTOR, ".direction")
    assert sorted(s.find_element(By.TAG_NAME, "strong").text for s in strips) == ["hue", "size"]
    form.find_element(By.CSS_SELECTOR, ".controls button").click()
    for strip in strips:
        (image,) = wait_for_answer(browser, strip)
        assert natural_width(browser, image) == grid_width(5, 16)
        assert timing_of(strip).startswith("latency ")


def test_projection_polls_its_job_and_shows_the_result_beside_the_target(browser, server, tmp_path):
    form = open_tool(browser, server, "styles", "project")
    form.find_element(By.NAME, "file").send_keys(png(tmp_path / "target.png", 24, 24))
    fill(form, "steps", 3)
    form.find_element(By.CSS_SELECTOR, "button").click()
    (reconstruction,) = wait_for_answer(browser, form)
    (target,) = wait_for_answer(browser, form, "img.target")
    assert natural_width(browser, reconstruction) == 16 and natural_width(browser, target) == 24
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: target.size["width"] == reconstruction.size["width"] > 0)  # (target shown larger)
    assert "PSNR" in form.text and "3 steps" in form.text
    assert timing_of(form).startswith("latency ")


def test_a_projection_cancelled_from_the_page_stops_on_the_server(browser, server, tmp_path):
    form = open_tool(browser, server, "styles", "project")
    form.find_element(By.NAME, "file").send_keys(png(tmp_path / "target.png", 24, 24))
    fill(form, "steps", 1000)
    form.find_element(By.CSS_SELECTOR, "button").click()
    cancel = form.find_element(By.CSS_SELECTOR, "button.cancel")
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: cancel.is_displayed() and "running: step" in form.text)
    cancel.click()
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: "projection cancelled: cancelled by the client" in form.text)
    assert not cancel.is_displayed()
    step = int(form.find_element(By.CSS_SELECTOR, "progress").get_attribute("value"))
    assert 0 < step < 1000


def test_translation_shows_input_and_output_and_offers_the_download(browser, server, tmp_path):
    form = open_tool(browser, server, "edges", "translate")
    form.find_element(By.NAME, "file").send_keys(png(tmp_path / "shape.png", 40, 24))  # choosing the file runs it
    (output,) = wait_for_answer(browser, form)
    (given,) = wait_for_answer(browser, form, "img.input")
    assert natural_width(browser, output) == natural_width(browser, given) == 40
    link = form.find_element(By.CSS_SELECTOR, "a.download")
    assert link.get_attribute("download") == "shape-edges.png" and link.get_attribute("href").startswith("blob:")
    assert timing_of(form).startswith("latency ")


def test_upscale_shows_before_and_after_at_the_same_size(browser, server, tmp_path):
    form = open_tool(browser, server, "upx4", "upscale")
    form.find_element(By.NAME, "file").send_keys(png(tmp_path / "small.png", 20, 12))
    (output,) = wait_for_answer(browser, form)
    assert natural_width(browser, output) == 80
    (given,) = wait_for_answer(browser, form, "img.input")  # side by side at one width (the input was shown larger than its output)
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda _: given.size["width"] == output.size["width"] and given.size["width"] > 0)
    before, after = wait_for_answer(browser, form, ".compare .before", 1)[0], form.find_element(By.CSS_SELECTOR, ".compare .after")
    assert before.size == after.size
    slider = form.find_element(By.CSS_SELECTOR, ".compare input[type=range]")
    browser.execute_script("arguments[0].value = 20; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert "80%" in before.get_attribute("style")
    assert timing_of(form).startswith("latency ")


def test_a_bad_upload_shows_the_apis_message(browser, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    form = open_tool(browser, server, "edges", "translate")
    form.find_element(By.NAME, "file").send_keys(str(text))
    expected = api_message(httpx.post(f"{server.url}/v1/models/edges/translate", files={"file": ("notes.txt", b"not an image", "text/plain")}))
    assert expected in shown_error(browser, form)


def test_server_timing_is_parsed_when_sent_and_latency_alone_shown_when_not(browser, server):
    browser.get(server.url + "/")
    stages = browser.execute_script("return parseServerTiming('queue;dur=0.12, compute;dur=0.40, encode;dur=0.09, total;dur=1.1')")
    assert stages == {"queue": 0.12, "compute": 0.4, "encode": 0.09, "total": 1.1}
    assert browser.execute_script("return timingText({latency: 12.3, stages: parseServerTiming(null)})") == "latency 12 ms"
    shown = browser.execute_script("return timingText({latency: 5, stages: parseServerTiming('total;dur=1.1, queue;dur=0.12, encode;desc=\"x\"')})")
    assert shown == "latency 5.0 ms — server: queue 0.1 ms · total 1.1 ms"


def test_every_tool_fits_a_phones_width(browser, server, tmp_path):
    """At 375 px the page scrolled sideways: tabs off the screen, 520 px edit strips, a 600 px
    before/after frame."""
    browser.set_window_size(375, 800)
    try:
        for model, tools in (("styles", ("generate", "style-mix", "interpolate", "edit", "project")), ("upx4", ("upscale",)), ("edges", ("translate",))):
            for tool in tools:
                form = open_tool(browser, server, model, tool)
                if tool in ("upscale", "translate"):
                    form.find_element(By.NAME, "file").send_keys(png(tmp_path / "small.png", 160, 96))
                    wait_for_answer(browser, form, ".compare .before" if tool == "upscale" else "img.answer")
                elif tool == "edit":
                    form.find_element(By.CSS_SELECTOR, ".controls button").click()
                    wait_for_answer(browser, form.find_element(By.CSS_SELECTOR, ".direction"))
                overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
                wide = browser.execute_script("return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5).map(e => e.tagName + '.' + e.className + '#' + e.id + ':' + Math.round(e.getBoundingClientRect().right)).slice(0, 8)")
                assert overflow <= 0, (model, tool, overflow, wide)
    finally:
        browser.set_window_size(1280, 1000)


def test_a_link_to_a_model_the_server_does_not_serve_says_so(browser, server):
    """It showed the gallery and nothing else; a malformed escape in the link threw URIError."""
    for fragment in ("no-such-model/generate", "%E0%A4%A"):
        browser.get("about:blank")
        browser.get(f"{server.url}/#{fragment}")
        notice = WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: d.find_element(By.ID, "hash-notice").text)
        assert "serves no model named" in notice


def test_the_page_follows_a_model_unloaded_and_loaded_again_and_keeps_what_was_typed(browser, repository):
    """The gallery was read once: a model unloaded, loaded or given a new version while the page
    was open went unseen; and a model that finished loading rebuilt its tools, wiping the seed
    typed and the class picked."""
    with running_server(repository, model_control=True, models="cdigits") as control, control.client() as client:
        form = open_tool(browser, control, "cdigits", "generate")
        fill(form, "seed", 4242)
        fill(form, "n", 1)
        Select(browser.find_element(By.CSS_SELECTOR, "#common select[name=class]")).select_by_value("3")
        facts = lambda _: browser.find_element(By.ID, "model-facts").text  # noqa: E731
        assert client.post("/v2/repository/models/cdigits/unload").status_code == 200
        WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: "unloaded" in facts(d))
        assert client.post("/v2/repository/models/cdigits/load").status_code == 200
        WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: "unloaded" not in facts(d) and " on " in facts(d))  # "onnx on cpu"
        form = browser.find_element(By.CSS_SELECTOR, '#tools form[data-tool="generate"]:not([hidden])')
        assert form.find_element(By.NAME, "seed").get_attribute("value") == "4242"
        picker = Select(browser.find_element(By.CSS_SELECTOR, "#common select[name=class]"))
        assert picker.first_selected_option.get_attribute("value") == "3"
        form.find_element(By.CSS_SELECTOR, "button").click()
        (image,) = wait_for_answer(browser, form)
        shown = browser.execute_script("return fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => Array.from(new Uint8Array(b)))", image)
        assert bytes(shown) == client.post("/v1/models/cdigits/generate", json={"seed": 4242, "n": 1, "class": 3}).content


def test_a_link_to_a_tool_with_a_quote_in_its_name_opens_the_models_first_tool(browser, server):
    """The tool's name went into a CSS selector as it was: `#digits/a"` threw, and no tool opened."""
    browser.get("about:blank")
    browser.get(f'{server.url}/#digits/a"')
    WebDriverWait(browser, SERVER_WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, '#tools form[data-tool="generate"]:not([hidden])'))
