"""The browser page (web/) in headless Chromium, against Python onnxruntime on the same bytes.

Playwright from PyPI drives Debian's chromium (/usr/bin/chromium, installed by make install);
the page loads the model with onnxruntime-web (WASM) from `python -m web`, which also proxies to a
real TorchServe.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
import requests
from PIL import Image

from contract import TOLERANCE
from contract.onnx_session import open_session, run_log_probs
from contract.preprocessing import InputSpec, decode, preprocess, preprocess_framed
from tests import hostile
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, encode_image, report, run_module

pytestmark = pytest.mark.slow

# The docs' picture of the page is rewritten only when asked (`UPDATE_SCREENSHOT=1 make test`), so
# that a test run leaves the checkout as it found it.
README_SCREENSHOT = ROOT / "docs" / "web-page.png"
PREDICTION = '[data-testid="prediction"][data-label]'


@pytest.fixture(scope="module")
def web(artifacts, torchserve):
    """`python -m web` on a free port, serving the test build and proxying to the test TorchServe."""
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--port", "0", "--quiet", "--build", str(artifacts.build_dir),
         "--torchserve-config", str(torchserve.workdir / "config.properties"),
         "--torchserve-dir", str(torchserve.workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"python -m web did not start: {line}{process.stdout.read() if process.poll() is not None else ''}"
        threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe would block it
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: run `make install` (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.goto(url)
    page.wait_for_selector('[data-testid="status"][data-ready]', timeout=60_000)
    return page


@pytest.fixture(scope="module")
def page(browser, web):
    page = open_page(browser, web)
    yield page
    page.close()


@pytest.fixture(scope="module")
def reference(artifacts):
    """Python onnxruntime with the contract's preprocessing: image bytes (and a framing choice)
    -> probabilities."""
    session = open_session(str(artifacts.build_dir / "model.onnx"))
    spec = InputSpec.from_bundle(artifacts.bundle)
    return lambda data, framing=None: np.exp(run_log_probs(session, preprocess(data, spec, framing)))[0]


def inputs_so_far(page) -> int:
    """How many inputs (strokes, files, clears) the page has numbered."""
    return int(page.evaluate("document.body.dataset.inputs || '0'"))


def page_answer(page, input_number: int, selector=PREDICTION):
    """The answer the page shows for its input number `input_number`, once shown."""
    element = page.wait_for_selector(f'{selector}[data-input="{input_number}"]', timeout=30_000)
    return int(element.get_attribute("data-label")), np.array(json.loads(element.get_attribute("data-probabilities")))


def give_file(page, data: bytes, name: str = "image.png"):
    """Clear, then choose a file: answers input number n + 2."""
    expected = inputs_so_far(page) + 2
    page.click('[data-testid="clear"]')
    page.set_input_files('[data-testid="file-input"]', files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    return page_answer(page, expected)


def assert_same_answer(page_probs, python_probs, what):
    dp = float(np.abs(page_probs - python_probs).max())
    assert page_probs.shape == python_probs.shape == (10,), what
    assert dp <= TOLERANCE, f"{what}: max |dp| {dp:.2e} between the page and Python onnxruntime"
    assert page_probs.argmax() == python_probs.argmax(), f"{what}: the page and Python disagree on the class"
    return dp


def odd_images(fashion_test_set):
    """Real test images in the forms people send, one for each path of the preprocessing:
    other sizes (two over the 512 pixels past which the decoder block-averages), RGB, translucent
    RGBA, palette, 1-bit (fitted or framed), photo-like and
    drawing-like inputs that framing turns into the data set's form, and JPEGs (Chromium and
    Pillow both decode with libjpeg-turbo: the same pixels), one turned upright by its EXIF tag."""
    images = fashion_test_set.images[256:265].numpy()
    big = Image.fromarray(images[0]).resize((90, 60), Image.Resampling.BICUBIC)
    rgb = np.stack([images[1], images[1] // 2, 255 - images[1]], axis=-1).astype(np.uint8)
    rgba = np.dstack([np.full_like(images[2], 200), images[2], images[2], images[2]]).astype(np.uint8)
    return {
        "gray 90x60": encode_image(big),
        "RGB 28x28": encode_image(rgb),
        "RGBA translucent 28x28": encode_image(rgba),
        "RGBA 37x51": encode_image(Image.fromarray(rgba).resize((37, 51))),
        "palette 112x112": encode_image(Image.fromarray(images[3]).resize((112, 112)), mode="P"),
        "1-bit 28x28": encode_image(images[4], mode="1"),
        "gray 20x20 (upscaled)": encode_image(Image.fromarray(images[5]).resize((20, 20))),
        "photo-like 120x90": photo_like(images[6]),
        "transparent drawing 140x140": transparent_drawing(images[7], (0, 0, 0)),
        "coloured translucent drawing 100x100": transparent_drawing(images[8], (200, 40, 90), size=100),
        "JPEG RGB 112x112": encode_image(Image.fromarray(rgb).resize((112, 112)), "JPEG", quality=90),
        "JPEG phone photo, EXIF orientation 6": phone_photo(photo_like(images[6])),
        # over 512 pixels: block-averaged before framing, on the page as on the server
        "photo-like PNG 1100x825": encode_image(Image.open(io.BytesIO(photo_like(images[0]))).resize(
            (1100, 825), Image.Resampling.BICUBIC)),
        "transparent drawing 600x600": transparent_drawing(images[7], (0, 0, 0), size=600),
        # what phones write (a multi-picture JPEG): its first picture, decoded as a JPEG (under
        # 512 pixels: the server's decoder scales larger JPEGs by DCT, the page by block means)
        "MPO phone photo 448x336": hostile.mpo([Image.open(io.BytesIO(photo_like(images[0]))).convert("RGB").resize(
            (448, 336), Image.Resampling.BICUBIC), Image.new("RGB", (112, 84))], quality=92),
    }


def phone_photo(png: bytes) -> bytes:
    """A JPEG whose pixels lie on their side, with the EXIF tag that says to turn them upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = Image.open(io.BytesIO(png)).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    return encode_image(sideways, "JPEG", quality=92, exif=exif)


def photo_like(image28: np.ndarray) -> bytes:
    """A dark object on lit paper, off centre, with a lighting gradient and sensor noise."""
    rng = np.random.default_rng(12)
    paper = 190 + 50 * np.linspace(0, 1, 120)[None, :] + rng.normal(0, 3, (90, 120))
    ink = np.asarray(Image.fromarray(image28).resize((56, 56), Image.Resampling.BICUBIC), np.float64)
    paper[12:68, 48:104] -= ink * 0.7
    return encode_image(np.clip(paper, 0, 255).astype(np.uint8))


def transparent_drawing(image28: np.ndarray, colour, size: int = 140) -> bytes:
    """Strokes of one colour on transparent pixels, as a canvas exports them."""
    alpha = Image.fromarray(image28).resize((size, size), Image.Resampling.BILINEAR)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.asarray(alpha)
    return encode_image(rgba)


@pytest.mark.torchserve
@pytest.mark.browser
def test_dropped_test_images_match_python_onnxruntime(page, reference, test_pngs):
    pngs, labels = test_pngs
    worst, correct = 0.0, 0
    for i, png in enumerate(pngs[:40]):
        label, probabilities = give_file(page, png, f"test{i:04d}.png")
        worst = max(worst, assert_same_answer(probabilities, reference(png), f"test image {i}"))
        correct += label == labels[i]
    assert correct >= 28, f"only {correct} of 40 test images classified right in the page"
    # the drop area takes the same path as the file input
    expected = inputs_so_far(page) + 2
    page.click('[data-testid="clear"]')
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        return transfer; }""", base64.b64encode(pngs[40]).decode())
    page.dispatch_event('[data-testid="drop"]', "drop", {"dataTransfer": transfer})
    worst = max(worst, assert_same_answer(page_answer(page, expected)[1], reference(pngs[40]), "dropped image"))
    report(f"web: 41 real test PNGs through the page, max |dp| vs Python onnxruntime {worst:.1e}")


@pytest.mark.torchserve
@pytest.mark.browser
def test_other_sizes_and_modes_match_python(page, reference, fashion_test_set):
    worst = 0.0
    for what, data in odd_images(fashion_test_set).items():
        _, probabilities = give_file(page, data, "odd.png")
        worst = max(worst, assert_same_answer(probabilities, reference(data), what))
    report(f"web: resized, RGB, RGBA, palette, 1-bit, photo-like, transparent and JPEG images, max |dp| vs Python onnxruntime {worst:.1e}")


@pytest.mark.torchserve
@pytest.mark.browser
def test_framing_choice_matches_python(page, reference, fashion_test_set, test_pngs):
    """The page's framing choice (auto, on, off) gives Python's answer for the same choice."""
    photo = photo_like(fashion_test_set.images[300].numpy())
    answers = {}
    try:
        for mode in ("off", "on", "auto"):
            page.select_option('[data-testid="framing"]', mode)
            _, answers[mode] = give_file(page, photo, "photo.png")
            assert_same_answer(answers[mode], reference(photo, mode), f"photo-like image, framing {mode}")
        assert np.abs(answers["off"] - answers["auto"]).max() > 1e-3, "framing changed nothing on a photo"
        page.select_option('[data-testid="framing"]', "on")
        _, framed_test_image = give_file(page, test_pngs[0][5], "test.png")
        assert_same_answer(framed_test_image, reference(test_pngs[0][5], "on"), "a test image, framing on")
    finally:
        page.select_option('[data-testid="framing"]', "auto")


JS_PREPROCESS = """async ([b64, bundle, via]) => {
    const m = await import('/preprocessing.js');
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const out = await m.preprocess(bytes, m.specFromBundle(bundle), 'auto', via);
    return {input: Array.from(out.input), framing: out.framing, decodedWith: out.decodedWith}; }"""


@pytest.mark.torchserve
@pytest.mark.browser
def test_preprocessing_module_matches_python(page, artifacts, fashion_test_set):
    """web/preprocessing.js and web/framing.js against contract/: the decoded RGBA bit for bit
    over every colour/alpha pair, luminance bit for bit on the 2D-canvas fallback too, and the
    model input and framing decisions on every kind of input."""
    rng = np.random.default_rng(16)
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 0] = np.arange(256)[None, :]
    rgba[..., 1:3] = rng.integers(0, 256, (256, 256, 2))
    rgba[..., 3] = np.arange(256)[:, None]
    every_alpha = base64.b64encode(encode_image(rgba)).decode()
    decoded = page.evaluate("""async ([b64, via]) => {
        const m = await import('/preprocessing.js');
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const rgba = await m.decodeRgba(bytes, via);
        return {via: rgba.via, rgba: Array.from(rgba.data), gray: Array.from(m.toGray(rgba))}; }""", [every_alpha, "webgl"])
    assert decoded["via"] == "webgl", "Chromium gave no WebGL context: the page decodes through the 2D canvas"
    assert np.array_equal(np.array(decoded["rgba"], np.uint8).reshape(rgba.shape), rgba)
    expected_gray = decode(encode_image(rgba)).gray  # composited over black, as the page does
    assert np.array_equal(np.array(decoded["gray"], np.float32).reshape(256, 256), expected_gray)
    fallback = page.evaluate("""async ([b64, via]) => {
        const m = await import('/preprocessing.js');
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        return Array.from(m.toGray(await m.decodeRgba(bytes, via))); }""", [every_alpha, "2d"])
    assert np.array_equal(np.array(fallback, np.float32).reshape(256, 256), expected_gray)

    spec = InputSpec.from_bundle(artifacts.bundle)
    assert spec.framing, "bundle.json records no framing recipe: the framed paths go untested"
    worst, framed = 0.0, 0
    for what, data in odd_images(fashion_test_set).items():
        out = page.evaluate(JS_PREPROCESS, [base64.b64encode(data).decode(), artifacts.bundle, "webgl"])
        python_input, python_report = preprocess_framed(data, spec)
        assert out["framing"]["applied"] == python_report["applied"], f"{what}: {out['framing']} vs {python_report}"
        for key in ("inverted", "box", "ink_from"):
            assert out["framing"].get(key) == python_report.get(key), f"{what}: {out['framing']} vs {python_report}"
        difference = float(np.abs(np.array(out["input"], np.float32) - python_input.ravel()).max())
        assert difference <= 1e-5, f"{what}: the page's input differs from Python's by {difference:.1e}"
        worst, framed = max(worst, difference), framed + python_report["applied"]
    assert framed >= 5, f"only {framed} inputs were framed: the framing port is hardly exercised"
    report(f"web: preprocessing.js vs contract/preprocessing.py: RGBA and luminance identical over 65,536 "
           f"colour/alpha pairs; model input max |dx| {worst:.1e} over {len(odd_images(fashion_test_set))} "
           f"converted, resized or framed ({framed}) images")


def draw(page, strokes):
    """Clear, then mouse strokes on the canvas (each a list of (x, y) in 0..1 of its size); the
    page answers each stroke: return the answer to the last, input number n + 1 + strokes."""
    expected = inputs_so_far(page) + 1 + len(strokes)
    page.click('[data-testid="clear"]')
    box = page.locator('[data-testid="canvas"]').bounding_box()
    for stroke in strokes:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=4)
        page.mouse.up()
    return page_answer(page, expected), expected


def drawn_bytes(page) -> bytes:
    b64 = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('[data-testid=input-download]').href)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text); }""")
    return base64.b64decode(b64)


def filled(x0, y0, x1, y1, step=0.03):
    """One zigzag stroke that fills a rectangle (coordinates in 0..1 of the canvas)."""
    columns = np.arange(x0, x1 + 1e-9, step)
    return [[point for i, x in enumerate(columns) for point in (((x, y0), (x, y1)) if i % 2 == 0 else ((x, y1), (x, y0)))]]


# Shapes a person would draw for a few Fashion-MNIST classes, light on the black canvas; framing
# crops and scales them like the data set's product photos.
SHAPES = {
    "Trouser": filled(0.28, 0.1, 0.42, 0.9) + filled(0.58, 0.1, 0.72, 0.9) + filled(0.28, 0.1, 0.72, 0.2),
    "Bag": filled(0.15, 0.4, 0.85, 0.85, 0.04) + [[(0.35, 0.4), (0.35, 0.15), (0.65, 0.15), (0.65, 0.4)]],
    "T-shirt/top": filled(0.3, 0.2, 0.7, 0.85, 0.04) + filled(0.1, 0.2, 0.3, 0.4, 0.04) + filled(0.7, 0.2, 0.9, 0.4, 0.04),
}


@pytest.mark.torchserve
@pytest.mark.browser
@pytest.mark.parametrize("expected", sorted(SHAPES))
def test_drawn_shapes(page, reference, artifacts, expected):
    (label, probabilities), _ = draw(page, SHAPES[expected])
    drawing = drawn_bytes(page)
    assert Image.open(io.BytesIO(drawing)).size == (280, 280)
    assert_same_answer(probabilities, reference(drawing), f"drawn {expected}")
    assert artifacts.bundle["classes"][label] == expected, \
        f"a drawn {expected} was classified as {artifacts.bundle['classes'][label]} ({probabilities.round(3)})"
    seen = page.evaluate("""() => Array.from(document.querySelector('[data-testid=seen]')
        .getContext('2d').getImageData(0, 0, 28, 28).data)""")
    assert max(seen) > 200, "the 28x28 view shows nothing of the drawing"


@pytest.mark.torchserve
@pytest.mark.browser
def test_a_finger_draws_too(browser, web):
    """Touch goes through the same pointer events as the mouse: a tap leaves a dot and is classified."""
    context = browser.new_context(has_touch=True)
    page = context.new_page()
    page.goto(web)
    page.wait_for_selector('[data-testid="status"][data-ready]', timeout=60_000)
    box = page.locator('[data-testid="canvas"]').bounding_box()
    page.click('[data-testid="clear"]')  # the dot must be light after a clear too
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    label, probabilities = page_answer(page, 2)
    assert label in range(10) and abs(probabilities.sum() - 1) < 1e-4
    center = page.evaluate("""() => Array.from(document.querySelector('[data-testid=canvas]')
        .getContext('2d').getImageData(140, 140, 1, 1).data)""")
    assert center[:3] == [255, 255, 255], "the tap left no dot on the canvas"
    context.close()


@pytest.mark.torchserve
@pytest.mark.browser
def test_server_answer_beside_the_browser_and_key_stays_on_the_server(browser, web, reference, server, test_pngs,
                                                                       tmp_path):
    page = open_page(browser, web)
    bodies = []
    page.on("response", lambda response: bodies.append(response))
    page.check('[data-testid="ask-server"]')
    png = test_pngs[0][7]
    _, browser_probs = give_file(page, png, "ask-server.png")
    _, server_probs = page_answer(page, inputs_so_far(page), '[data-testid="server-prediction"]')
    on_image = assert_same_answer(server_probs, browser_probs, "TorchServe beside the page, on a test image")
    assert "same class" in page.inner_text('[data-testid="agreement"]')
    # a drawing: framed by framing.js in the page and by contract/framing.py in the handler
    (_, drawn_probs), drawing = draw(page, SHAPES["Trouser"])
    _, server_drawn_probs = page_answer(page, drawing, '[data-testid="server-prediction"]')
    on_drawing = assert_same_answer(server_drawn_probs, drawn_probs, "TorchServe beside the page, on a drawing")
    report(f"web: TorchServe through the page's proxy vs the page, max |dp| {on_image:.1e} on a test image, "
           f"{on_drawing:.1e} on a drawing (framed by each)")

    key = server.key("inference")
    seen = [(r.url, r.all_headers(), r.body()) for r in bodies]
    assert any(url.endswith("/predict") for url, _, _ in seen), "the page did not call the proxy"
    for url, headers, body in seen:
        assert key.encode() not in body and key not in json.dumps(headers), f"the key reached the page in {url}"
    screenshot = README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "web-page.png"
    page.screenshot(path=str(screenshot), full_page=True,
                    style='[data-testid="timing"], [data-testid="status"] { visibility: hidden; }')
    assert screenshot.read_bytes().startswith(b"\x89PNG"), "the page's screenshot is not a PNG"
    page.close()


@pytest.mark.torchserve
def test_proxy_refuses_other_sites_and_serves_only_the_page(web, server, test_pngs):
    png = test_pngs[0][0]
    ok = requests.post(web + "predict", data=png, headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["label"] in range(10)
    unframed = requests.post(web + "predict", data=png, timeout=30,
                             headers={"Content-Type": "application/octet-stream", "X-Framing": "off"})
    assert unframed.json()["framing"]["mode"] == "off", "the proxy did not pass the framing choice on"
    foreign = requests.post(web + "predict", data=png, timeout=30,
                            headers={"Origin": "http://evil.example", "Content-Type": "application/octet-stream"})
    assert foreign.status_code == 403 and "cross-origin" in foreign.json()["error"]
    rebound = requests.get(web, headers={"Host": "evil.example"}, timeout=10)
    assert rebound.status_code == 421
    for path in ("key_file.json", "../key_file.json", "web/server.py", "model/../../config.properties", "ort/package.json"):
        response = requests.get(web + path, timeout=10)
        assert response.status_code == 404, path
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(web).netloc, timeout=30)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Length", "-5")  # would read to the end of the stream
    connection.endheaders(b"x")
    bad_length = connection.getresponse()
    assert bad_length.status == 400 and "Content-Length" in json.loads(bad_length.read())["error"]
    connection.close()
    too_big = requests.post(web + "predict", data=b"\0" * ((1 << 20) + 1), timeout=30)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    not_an_image = requests.post(web + "predict", data=b"not an image", timeout=30,
                                 headers={"Content-Type": "application/octet-stream"})
    assert not_an_image.status_code == 400 and "error" in not_an_image.json()


@pytest.mark.torchserve
@pytest.mark.browser
def test_bad_file_is_explained_and_the_page_goes_on(page, reference, test_pngs):
    page.click('[data-testid="clear"]')
    page.set_input_files('[data-testid="file-input"]',
                         files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    error = page.wait_for_selector('[data-testid="error"]:not([hidden])', timeout=30_000)
    assert "cannot decode" in error.inner_text()
    assert page.get_attribute('[data-testid="prediction"]', "data-label") is None
    png = test_pngs[0][3]
    _, probabilities = give_file(page, png, "after-error.png")
    assert_same_answer(probabilities, reference(png), "the image after a bad file")
    assert page.is_hidden('[data-testid="error"]')


@pytest.mark.torchserve
@pytest.mark.browser
def test_page_works_offline_weight_and_time_to_first_prediction(browser, web, test_pngs):
    """Every request goes to the page's own server (no CDN): the page works with the network
    unplugged. Measures what the page downloads and how long it takes to answer."""
    context = browser.new_context()
    requested = []
    context.on("request", lambda request: requested.append(request))
    page = context.new_page()
    started = time.perf_counter()
    page.goto(web)
    page.wait_for_selector('[data-testid="status"][data-ready]', timeout=60_000)
    ready_s = time.perf_counter() - started
    given = time.perf_counter()
    page.set_input_files('[data-testid="file-input"]',
                         files=[{"name": "first.png", "mimeType": "image/png", "buffer": test_pngs[0][0]}])
    page.wait_for_selector(PREDICTION, timeout=30_000)
    first_s = time.perf_counter() - given
    first_in_page_ms = float(page.get_attribute('[data-testid="timing"]', "data-ms"))
    page.set_input_files('[data-testid="file-input"]',
                         files=[{"name": "second.png", "mimeType": "image/png", "buffer": test_pngs[0][1]}])
    page.wait_for_selector(f'{PREDICTION}[data-input="2"]', timeout=30_000)
    second_in_page_ms = float(page.get_attribute('[data-testid="timing"]', "data-ms"))
    model_ready_ms = float(page.evaluate("document.body.dataset.modelReadyMs"))
    assert all(r.url.startswith(web) for r in requested), [r.url for r in requested if not r.url.startswith(web)]
    sizes = {}
    for request in requested:
        response = request.response()
        assert response is not None and response.ok, request.url
        sizes[request.url[len(web) - 1:]] = len(response.body())
    wasm = sum(n for url, n in sizes.items() if url.endswith(".wasm"))
    model = sizes["/model/model.onnx"]
    total = sum(sizes.values())
    context.close()
    report(f"web: page weight {total / 1e6:.2f} MB ({wasm / 1e6:.2f} MB wasm, {model / 1e3:.0f} kB model.onnx, "
           f"{(total - wasm - model) / 1e3:.0f} kB page, JS and bundle.json); model ready {model_ready_ms:.0f} ms after "
           f"navigation ({ready_s:.2f} s from goto), first prediction {first_s * 1000:.0f} ms after the file was given "
           f"({first_in_page_ms:.0f} ms of preprocessing and inference in the page; the next {second_in_page_ms:.0f} ms) "
           "(headless Chromium, this host)")


def test_web_refuses_other_interfaces_and_says_what_is_missing(tmp_path, artifacts):
    exposed = run_module("web", "--host", "0.0.0.0", "--build", str(artifacts.build_dir), check=False, timeout=60)
    assert exposed.returncode != 0 and "not a loopback address" in exposed.stderr
    no_model = run_module("web", "--port", "0", "--build", str(tmp_path), check=False, timeout=60)
    assert no_model.returncode != 0 and "make export" in no_model.stderr
