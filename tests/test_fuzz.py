"""Fuzz the one preprocessing function: no request body may produce anything but a model input
or InvalidInput (400/413), and none may cost more than the bound the server promises.

Hypothesis mutates real PNG, JPEG, GIF, TIFF, WebP, BMP and JSON bodies, their containers
included (APNG, EXIF-wrapped, progressive and multi-picture MPO JPEGs, JPEG-compressed and
multi-page TIFF, animated GIF and WebP): bit flips, overwritten header fields, huge numbers,
insertions, deletions, truncation, duplicated runs. It also generates arbitrary JSON values.
Derandomized, so that `make test` sees the same examples on every run (the first run also fills
hypothesis' cache in .hypothesis/).
"""
from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contract.preprocessing import InputSpec, InvalidInput, preprocess
from tests import hostile
from tests.helpers import encode_image, report

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.2860,), std=(0.3530,))
MEMORY_BOUND = 100 * 10**6  # bytes a single body may add to the process's peak RSS
CPU_BOUND = 1.0  # CPU seconds a single body may cost
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=600,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def seeds() -> dict[str, list[bytes]]:
    d = hostile.digit()
    rgba = np.dstack([d, d, d, d])
    exif = Image.Exif()
    exif[0x0112] = 6  # sideways, as phones save
    return {
        "PNG": [encode_image(d, "PNG"), encode_image(Image.fromarray(rgba, "RGBA"), "PNG"),
                encode_image(Image.fromarray(d).convert("P"), "PNG"),
                encode_image(Image.fromarray(d.astype(np.uint16) * 257), "PNG"),
                hostile.png_of_size(64, 48, "L", interlace=True), hostile.animated("PNG", [d, 255 - d])],
        "JPEG": [encode_image(d, "JPEG", quality=90), encode_image(Image.fromarray(d).convert("RGB"), "JPEG", progressive=True),
                 encode_image(Image.fromarray(d).convert("CMYK"), "JPEG"),
                 encode_image(Image.fromarray(d), "JPEG", exif=exif),
                 hostile.mpo([Image.fromarray(d).convert("RGB"), Image.fromarray(255 - d).convert("RGB")]),
                 hostile.mpo([Image.fromarray(d).convert("RGB"), Image.fromarray(d).convert("RGB")], progressive=True)],
        "GIF": [encode_image(d, "GIF"), hostile.animated("GIF", [d, 255 - d])],
        "TIFF": [hostile.tiff(d), hostile.tiff(d, compression="tiff_lzw"), hostile.tiff(d, compression="tiff_adobe_deflate"),
                 hostile.tiff(d, compression="jpeg"),
                 hostile.tiff(d.astype(np.float32) / 255), hostile.animated("TIFF", [d, 255 - d])],
        "WEBP_BMP": [encode_image(d, "WEBP", lossless=True), encode_image(d, "WEBP", quality=80),
                     encode_image(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), encode_image(d, "BMP"),
                     hostile.animated("WEBP", [d, 255 - d], lossless=True)],
        "JSON": [json.dumps({"image": hostile.b64(encode_image(d, "PNG"))}).encode(),
                 json.dumps({"pixels": d.tolist()}).encode(),
                 json.dumps({"image": "data:image/png;base64," + hostile.b64(encode_image(d, "PNG"))}).encode()],
    }


SEEDS = seeds()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "huge", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "huge":  # a width, height, length or offset field set to an extreme value
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\xff\xff",
                                                    b"\xff\xff", b"\x00\x00\x00\x00", b"\x80\x00\x00\x00"]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = bytes(data[at:at + draw(st.integers(1, 64))]) * draw(st.integers(2, 50))
    return bytes(data)


def check_one(body) -> str:
    """A model input or InvalidInput, within the memory and CPU bounds; anything else fails."""
    rss_before, cpu_before = hostile.reset_peak_memory(), time.process_time()
    try:
        array = preprocess(body, SPEC)
        outcome = "input"
    except InvalidInput as error:
        assert error.status in (400, 413) and str(error), (error.status, str(error))
        outcome = f"refused {error.status}"
    else:
        assert array.shape == (1, 1, 28, 28) and array.dtype == np.float32
        assert np.isfinite(array).all()
    cpu, peak = time.process_time() - cpu_before, hostile.peak_memory() - rss_before
    assert cpu <= CPU_BOUND, f"{cpu:.2f} s of CPU"
    assert peak <= MEMORY_BOUND, f"peak RSS grew by {peak / 2**20:.1f} MiB"
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_mutated_bodies_give_an_input_or_a_4xx(kind):
    outcomes = Counter()

    @FUZZ
    @given(mutated(SEEDS[kind]))
    def fuzz(body):
        outcomes[check_one(body)] += 1
    fuzz()
    report(f"fuzz {kind}: {sum(outcomes.values())} mutated bodies: {dict(sorted(outcomes.items()))}")
    # a fuzzer whose mutants are all refused (or all accepted) explores nothing past the header
    assert outcomes["input"] > 0 and outcomes["refused 400"] > 0, outcomes


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=10) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=50)
pixel_values = st.one_of(st.integers(-10**400, 10**400), st.floats(), st.booleans(), st.none(), st.text(max_size=3))


@st.composite
def pixel_rows(draw) -> list:
    """Rows of 27 to 29 values, nearly all valid, with one odd value somewhere."""
    rows, cols = draw(st.integers(27, 29)), draw(st.integers(27, 29))
    grid = [[draw(st.integers(0, 255))] * cols for _ in range(rows)]
    grid[draw(st.integers(0, rows - 1))][draw(st.integers(0, cols - 1))] = draw(pixel_values)
    return grid


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(st.one_of(json_values, st.fixed_dictionaries({"pixels": pixel_rows()}),
                 st.fixed_dictionaries({"image": st.text(alphabet="ABCDEFabcdef0123456789+/=-_ \n:;,data", max_size=200)}),
                 st.dictionaries(st.sampled_from(["image", "pixels", "x"]), json_values, max_size=3)))
def test_any_json_value_gives_an_input_or_a_4xx(value):
    check_one(value)  # as TorchServe hands over an application/json body, already parsed
    try:
        text = json.dumps(value)
    except (ValueError, OverflowError):
        return
    check_one(text.encode())  # as raw bytes, parsed by us
