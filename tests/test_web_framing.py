"""web/framing.js against contract/framing.py in headless Chromium, on the page-cleaning forms of
bench/forms.py (ruled, squared and dotted paper, a shadow, fine pen, marker, ...): the same
luminance in, the same 28 x 28 out, value for value, and the same decisions reported.

No model and no TorchServe: web/ is served as static files and the page imports framing.js.
"""
from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from bench.forms import DIGIT_FORMS, make_form
from bench.standin_digits import make as make_digits
from contract.framing import frame, recipe_for
from contract.preprocessing import decode
from tests.helpers import ROOT, report

pytestmark = pytest.mark.browser

REPORTED = ("applied", "inverted", "box", "ink_from", "lines_removed", "components", "reason")
JS_FRAME = """async ([luma, alpha, width, height, recipe, mode]) => {
    const m = await import('/framing.js');
    const t = performance.now();
    const out = m.frame(luma, alpha, width, height, recipe, mode);
    return {framed: out.framed ? Array.from(out.framed) : null, report: out.report, ms: performance.now() - t}; }"""


@pytest.fixture(scope="module")
def static_web():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ROOT / "web"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def framing_page(static_web):
    from tests.helpers import CHROMIUM, CHROMIUM_ARGS
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: run `make install` (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(static_web)  # the directory listing: an origin to import framing.js from
        yield page
        browser.close()


def cases():
    """(what, luminance, alpha or None, recipe): every form of a stand-in digit through the MNIST
    recipe, a few through Fashion-MNIST's (no page cleaning), and the data set's form."""
    digits, _ = make_digits(len(DIGIT_FORMS) + 2, seed=11)
    out = []
    for i, form in enumerate(DIGIT_FORMS):
        luma, alpha = decode(make_form(digits[i], form, 0, i)).luminance_and_opacity()
        out.append((f"mnist {form}", luma, alpha, recipe_for("mnist")))
        if form in ("paper", "shadow", "canvas", "darkmode"):
            out.append((f"fashion-mnist recipe, {form}", luma, alpha, recipe_for("fashion-mnist")))
    return out


def test_framing_js_matches_python_on_every_form(framing_page):
    worst, slowest, checked = 0.0, 0.0, 0
    for what, luma, alpha, recipe in cases():
        h, w = luma.shape
        js = framing_page.evaluate(JS_FRAME, [luma.astype(np.float64).ravel().tolist(),
                                              None if alpha is None else alpha.astype(np.float64).ravel().tolist(),
                                              w, h, recipe, "auto"])
        framed, python_report = frame(luma, alpha, recipe, "auto")
        for key in REPORTED:
            assert js["report"].get(key) == python_report.get(key), f"{what}: {key}: {js['report']} vs {python_report}"
        if "stroke_width" in python_report:
            assert js["report"]["stroke_width"] == pytest.approx(python_report["stroke_width"], abs=1e-9), what
        assert (js["framed"] is None) == (framed is None), what
        if framed is not None:
            difference = float(np.abs(np.array(js["framed"], np.float32).reshape(28, 28) - framed).max())
            assert difference <= 1e-3, f"{what}: framing.js differs from framing.py by {difference:.1e} (0..255)"
            worst = max(worst, difference)
        slowest = max(slowest, js["ms"])
        checked += 1
    assert checked >= len(DIGIT_FORMS)
    report(f"web: framing.js vs contract/framing.py on {checked} forms (ruled, squared, dotted paper, shadow, "
           f"fine pen, marker, ...): max |d| {worst:.1e} of 255; slowest frame() in Chromium {slowest:.0f} ms")
