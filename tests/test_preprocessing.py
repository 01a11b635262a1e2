"""The one preprocessing function, on its own: formats, modes, sizes, and every refusal."""
import base64
import json

import numpy as np
import pytest
from PIL import Image

import time

from tests import hostile
from tests.helpers import encode_image, report
from contract.preprocessing import (MAX_BODY_BYTES, WORK_SIDE, InputSpec, InvalidInput, decode,
                                    decode_image, preprocess)

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.2860,), std=(0.3530,))


def digit() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 10:18] = rng.integers(120, 256, (16, 8))
    return image




def expected(gray: np.ndarray) -> np.ndarray:
    x = gray.astype(np.float32) / np.float32(255)
    return ((x - np.float32(SPEC.mean[0])) / np.float32(SPEC.std[0]))[None, None]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "TIFF", "WEBP"])
def test_lossless_formats_give_the_exact_pixels(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode_image(Image.fromarray(digit()), fmt, **kw), SPEC)
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected(digit()))


def test_jpeg_is_close():
    out = decode_image(encode_image(Image.fromarray(digit()), "JPEG", quality=95), SPEC)
    assert np.abs(out - expected(digit())).max() * SPEC.std[0] * 255 < 40  # JPEG ringing, in grey levels


@pytest.mark.parametrize("mode", ["RGB", "P", "LA", "RGBA", "I;16", "1"])
def test_modes_become_the_same_gray_image(mode):
    gray = digit() if mode != "1" else (digit() > 127).astype(np.uint8) * 255
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit: 255 -> 65535
    else:
        image = Image.fromarray(gray).convert(mode)
    out = decode_image(encode_image(image, "PNG"), SPEC)
    np.testing.assert_allclose(out, expected(gray), atol=1e-5)


def test_transparency_is_composited_over_black():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255          # white everywhere ...
    rgba[10:18, 10:18, 3] = 255  # ... but opaque only in the square
    out = decode_image(encode_image(Image.fromarray(rgba, "RGBA"), "PNG"), SPEC)
    gray = np.zeros((28, 28), np.uint8)
    gray[10:18, 10:18] = 255
    np.testing.assert_allclose(out, expected(gray), atol=1e-5)


def test_any_size_keeps_its_aspect_and_is_centred_on_black():
    big = np.kron(digit(), np.ones((10, 10), np.uint8))  # 280x280
    out = decode_image(encode_image(Image.fromarray(big), "PNG"), SPEC)
    assert out.shape == (1, 1, 28, 28)
    assert np.abs(out - expected(digit())).mean() < 0.1
    wide = decode_image(encode_image(Image.fromarray(np.full((10, 40), 255, np.uint8)), "PNG"), SPEC)
    assert wide.shape == (1, 1, 28, 28)
    assert wide[0, 0, 0, 14] == expected(np.zeros((1, 1), np.uint8)).item()  # padding is black


def test_json_forms_match_the_image_bytes():
    png = encode_image(Image.fromarray(digit()), "PNG")
    reference = decode_image(png, SPEC)
    as_base64 = json.dumps({"image": base64.b64encode(png).decode()}).encode()
    as_data_url = {"image": "data:image/png;base64," + base64.b64encode(png).decode()}
    as_pixels = {"pixels": digit().tolist()}
    for body in (as_base64, as_base64.decode(), as_data_url, as_pixels):
        np.testing.assert_array_equal(preprocess(body, SPEC), reference)


def bomb() -> bytes:
    return hostile.png_declaring(20000, 20000)  # 400 megapixels, read from the header alone


@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "empty body"),
    (None, 400, "got a JSON null"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "not an image"),
    (bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)), 400, "not an image"),
    (b"x" * (MAX_BODY_BYTES + 1), 413, "limit"),
    (b'{"pixels": [[1, 2]', 400, "malformed JSON"),
    (b"[1, 2, 3]", 400, "JSON object"),
    ("plain text", 400, "got text that is not an image"),
    ({"pixels": [[0] * 28] * 27}, 400, "28 rows of 28"),
    ({"pixels": [0] * 784}, 400, "flat list"),
    ({"pixels": [[300] * 28] * 28}, 400, "0..255"),
    ({"pixels": [[-1] * 28] * 28}, 400, "0..255"),
    ({"pixels": [[float("nan")] * 28] * 28}, 400, "NaN"),
    ({"pixels": [["1"] * 28] * 28}, 400, "no strings"),
    ({"pixels": [[True] * 28] * 28}, 400, "booleans"),
    ({"image": "not base64!"}, 400, "base64"),
    ({"image": 42}, 400, "base64 string"),
    ({}, 400, "exactly one"),
    ({"image": "", "pixels": []}, 400, "exactly one"),
], ids=lambda v: None if not isinstance(v, (bytes, str, dict)) else repr(v)[:24])
def test_refusals_say_what_was_wrong(body, status, words):
    with pytest.raises(InvalidInput) as caught:
        preprocess(body, SPEC)
    assert caught.value.status == status
    assert words in str(caught.value)
    assert caught.value.to_response() == {"error": str(caught.value), "status": status}


def test_oversized_json_is_refused_before_parsing():
    body = b'{"pixels": [' + b"0, " * (MAX_BODY_BYTES // 3) + b"0]}"
    with pytest.raises(InvalidInput, match="JSON body of .* exceeds") as caught:
        preprocess(body, SPEC)
    assert caught.value.status == 413
    with pytest.raises(InvalidInput, match="exceeds") as caught:  # base64 too large once decoded
        preprocess({"image": "A" * (MAX_BODY_BYTES * 2)}, SPEC)
    assert caught.value.status == 413


def test_truncated_png_of_a_real_image():
    png = encode_image(Image.fromarray(digit()), "PNG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(png[: len(png) // 2], SPEC)


def test_decompression_bomb_is_refused_before_decoding():
    body = bomb()
    assert len(body) < MAX_BODY_BYTES
    with pytest.raises(InvalidInput, match="decompression bomb") as caught:
        decode_image(body, SPEC)
    assert caught.value.status == 413
    # below Pillow's own bomb threshold, our pixel limit still refuses it
    with pytest.raises(InvalidInput, match="5000x5000 pixels exceeds the limit") as caught:
        decode_image(hostile.png_declaring(5000, 5000), SPEC)
    assert caught.value.status == 413


def test_preprocessing_imports_neither_torch_nor_ts():
    import subprocess
    import sys
    code = ("import sys; import contract.preprocessing, contract.bundle, contract.responses; "
            "bad = {'torch', 'ts'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("case", hostile.bad_cases() + hostile.good_cases(), ids=lambda c: c.name)
def test_odd_and_hostile_bodies_in_process(case):
    """Each class of input: its status and message, within 100 MB of memory and 1 s of CPU."""
    decode_image(hostile.png_of_size(64, 64), SPEC)  # allocators warm, plugins loaded
    rss_before, cpu_before = hostile.reset_peak_memory(), time.process_time()
    try:
        out, status, message = preprocess(case.body, SPEC), 200, ""
    except InvalidInput as error:
        out, status, message = None, error.status, str(error)
    cpu, peak = time.process_time() - cpu_before, hostile.peak_memory() - rss_before
    assert status == case.status, message
    if case.words:
        assert case.words in message
    else:
        assert out.shape == (1, 1, 28, 28) and np.isfinite(out).all()
    assert peak <= 100 * 10**6 and cpu <= 1.0, (peak, cpu)
    if peak > 10 * 2**20 or cpu > 0.05:
        report(f"preprocessing in-process, {case.name}: peak RSS +{peak / 2**20:.1f} MiB, CPU {cpu * 1e3:.0f} ms")


def test_large_images_are_block_averaged():
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (1000, 1024), dtype=np.uint8)  # factor 2 down to WORK_SIDE
    decoded = decode(encode_image(gray, "PNG"))
    assert decoded.gray.shape == (500, 512) and decoded.alpha is None and decoded.format == "PNG"
    np.testing.assert_allclose(decoded.gray, gray.reshape(500, 2, 512, 2).mean(axis=(1, 3)), atol=1e-4)


def test_alpha_is_premultiplied_before_averaging():
    """Opaque black and transparent white pixels, alternating: over black, all of it is black.
    Averaging colour and alpha apart would make it grey (63.75)."""
    rgba = np.zeros((2 * WORK_SIDE, 2 * WORK_SIDE, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[::2, ::2] = rgba[1::2, 1::2] = (255, 255, 255, 0)
    decoded = decode(encode_image(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.gray.shape == (WORK_SIDE, WORK_SIDE)
    np.testing.assert_allclose(decoded.gray, 0, atol=1e-4)
    np.testing.assert_allclose(decoded.alpha, 127.5, atol=1e-4)


def test_first_frame_only():
    first, second = hostile.digit(), 255 - hostile.digit()
    for fmt in ("GIF", "TIFF", "PNG", "WEBP"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        both = hostile.animated(fmt, [first, second], **kw)
        np.testing.assert_array_equal(decode(both).gray, first.astype(np.float32), err_msg=fmt)
