"""Odd and hostile request bodies, each one a class of input a user or an attacker may send.

Shared by the preprocessing tests (in-process, with their cost measured), the serving tests (a
real TorchServe, mixed with good requests) and the fuzz test (as seeds). Every body is built here
from Pillow's own encoders or by patching a real file's header; none is over the 1 MiB body limit.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.helpers import encode_image


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    content_type: str
    status: int  # what the server must answer
    words: str | None  # words the error must contain (None for a 200)


def digit(side: int = 28) -> np.ndarray:
    image = np.zeros((side, side), np.uint8)
    image[side // 5: side * 4 // 5, side * 3 // 8: side * 5 // 8] = 200
    return image


def png_of_size(width: int, height: int, mode: str = "L", interlace: bool = False) -> bytes:
    """A PNG of any declared size, written chunk by chunk: no width x height array is built."""
    channels = {"L": 1, "RGBA": 4}[mode]
    colour = {"L": 0, "RGBA": 6}[mode]
    row = b"\x00" + bytes(width * channels)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 1 if interlace else 0)
    if interlace:  # Adam7 of an all-zero image: seven passes of zero rows
        data = zlib.compress(b"".join(_adam7_rows(width, height, channels)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (and its checksum) is rewritten to declare width x height."""
    real = png_of_size(1, 1)
    header = struct.pack(">II", width, height) + real[24:29]
    return real[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + real[33:]


def _adam7_rows(width, height, channels):
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            row = b"\x00" + bytes(cols * channels)
            yield from (row for _ in range(rows))


def webp_declaring(width: int, height: int) -> bytes:
    """A real lossless WebP whose header is patched to declare width x height."""
    real = encode_image(Image.new("L", (16, 16)), "WEBP", lossless=True)
    assert real[12:16] == b"VP8L"
    bits = (width - 1) | ((height - 1) << 14) | (int.from_bytes(real[21:25], "little") & ~((1 << 28) - 1))
    return real[:21] + bits.to_bytes(4, "little") + real[25:]


def jpeg_with_scans(count: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `count` start-of-scan markers."""
    real = encode_image(Image.fromarray(digit(64)), "JPEG", progressive=True)
    last = real.rindex(b"\xff\xda")
    scan = real[last:-2]
    return real[:-2] + scan * (count - real.count(b"\xff\xda")) + b"\xff\xd9"


def mpo(frames: list[Image.Image], **kw) -> bytes:
    """A multi-picture JPEG (CIPA DC-007), as phones write for HDR photos: Pillow's MPO writer."""
    out = io.BytesIO()
    frames[0].save(out, format="MPO", save_all=True, append_images=frames[1:], **kw)
    return out.getvalue()


def mpo_with_scans(count: int, side: int = 1024) -> bytes:
    """A valid two-picture MPO whose first, progressive picture has `count` start-of-scan markers.

    The first picture's last scan is repeated, and the MP index (its size, the second picture's
    offset) is rewritten to match, so that the second picture is still found where it lies.
    """
    first = Image.fromarray(digit(side)).convert("RGB")
    real = mpo([first, Image.new("RGB", (32, 32))], progressive=True)
    with Image.open(io.BytesIO(real)) as image:
        entries = image.mpinfo[0xB002]
    first_size, second_offset = entries[0]["Size"], entries[1]["DataOffset"]
    primary = real.index(struct.pack("<LLL", 0x030000, first_size, 0))  # the MP entries, as written
    first, rest = real[:first_size], real[first_size:]
    last = first.rindex(b"\xff\xda")
    extra = first[last:-2] * (count - real.count(b"\xff\xda"))
    patched = bytearray(first[:-2] + extra + b"\xff\xd9" + rest)
    struct.pack_into("<L", patched, primary + 4, first_size + len(extra))
    struct.pack_into("<L", patched, primary + 16 + 8, second_offset + len(extra))
    return bytes(patched)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def png_with_text_bombs(count: int) -> bytes:
    """A 28x28 PNG carrying `count` zTXt chunks that each inflate to a MiB."""
    real = encode_image(digit(), "PNG")
    inflates = zlib.compress(b"a" * ((1 << 20) - 64), 9)
    texts = b"".join(_png_chunk(b"zTXt", b"k%d\0\0" % i + inflates) for i in range(count))
    return real[:33] + texts + real[33:]  # after IHDR: read when the file is opened


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bmp_declaring(width: int, height: int) -> bytes:
    real = encode_image(Image.new("L", (4, 4)), "BMP")
    return real[:18] + struct.pack("<ii", width, height) + real[26:]


def tiff(array: np.ndarray, **kw) -> bytes:
    return encode_image(Image.fromarray(array), "TIFF", **kw)


def animated(fmt: str, frames: list[np.ndarray], **kw) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    return encode_image(images[0], fmt, save_all=True, append_images=images[1:], **kw)


def other_format(fmt: str) -> bytes:
    return encode_image(Image.fromarray(digit()).convert("RGB"), fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_line_breaks(text: str) -> str:
    """What `base64 file.png` prints: 76 characters a line."""
    return "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"


def good_cases() -> list[Case]:
    """Unusual but valid: each must be answered 200, like a plain PNG of the same digit."""
    png = encode_image(digit(), "PNG")
    line = np.zeros((1, 8192), np.uint8)
    line[0, 4000:4200] = 255
    float_image = digit().astype(np.float32) / 255
    return [
        Case("base64 with line breaks", json.dumps({"image": with_line_breaks(b64(png))}).encode(), "application/json", 200, None),
        Case("data URL in JSON", json.dumps({"image": "data:image/png;base64," + b64(png)}).encode(), "application/json", 200, None),
        Case("data URL as the body", ("data:image/png;base64," + b64(png)).encode(), "text/plain", 200, None),
        Case("base64 text as the body", with_line_breaks(b64(png)).encode(), "text/plain", 200, None),
        Case("URL-safe base64 without padding", json.dumps({"image": base64.urlsafe_b64encode(png).decode().rstrip("=")}).encode(), "application/json", 200, None),
        Case("8192x1 PNG", encode_image(line, "PNG"), "image/png", 200, None),
        Case("4-megapixel RGBA PNG", png_of_size(2048, 2048, "RGBA"), "image/png", 200, None),
        Case("4-megapixel interlaced PNG", png_of_size(2048, 2048, "L", interlace=True), "image/png", 200, None),
        Case("8192x4096 baseline JPEG", encode_image(Image.new("L", (8192, 4096)), "JPEG", quality=10), "image/jpeg", 200, None),
        Case("4000x3000 baseline MPO (phone photo)", mpo([Image.new("RGB", (4000, 3000), (20, 20, 20)), Image.new("RGB", (1000, 750))], quality=50), "image/jpeg", 200, None),
        Case("EXIF-wrapped baseline JPEG", encode_image(Image.new("RGB", (4000, 3000)), "JPEG", quality=10, exif=_exif_orientation(6)), "image/jpeg", 200, None),
        Case("progressive MPO", mpo([Image.fromarray(digit()).convert("RGB"), Image.new("RGB", (28, 28))], progressive=True), "image/jpeg", 200, None),
        Case("JPEG-compressed TIFF", tiff(digit(), compression="jpeg"), "image/tiff", 200, None),
        Case("APNG", animated("PNG", [digit(), 255 - digit()]), "image/png", 200, None),
        Case("animated WebP", animated("WEBP", [digit(), 255 - digit()], lossless=True), "image/webp", 200, None),
        Case("4-megapixel progressive JPEG", encode_image(Image.new("RGB", (2048, 2048)), "JPEG", quality=10, progressive=True, subsampling=0), "image/jpeg", 200, None),
        Case("4-megapixel WebP", encode_image(Image.new("RGBA", (2048, 2048)), "WEBP", lossless=True), "image/webp", 200, None),
        Case("4-megapixel GIF", encode_image(Image.new("P", (2048, 2048)), "GIF"), "image/gif", 200, None),
        Case("4-megapixel float TIFF", tiff(np.zeros((2048, 2048), np.float32), compression="tiff_adobe_deflate"), "image/tiff", 200, None),
        Case("float TIFF 0..1", tiff(float_image), "image/tiff", 200, None),
        Case("animated GIF", animated("GIF", [digit(), 255 - digit()]), "image/gif", 200, None),
        Case("multi-page TIFF", animated("TIFF", [digit(), 255 - digit()]), "image/tiff", 200, None),
    ]


def bad_cases() -> list[Case]:
    """Each must be answered with its 4xx and a message that says what was wrong."""
    nan_image = np.zeros((28, 28), np.float32)
    nan_image[3, 3] = np.nan
    inf_image = np.full((28, 28), np.inf, np.float32)
    return [
        Case("60000x1 PNG of 80 bytes", png_of_size(60000, 1), "image/png", 413, "width of 60000"),
        Case("1x60000 PNG", png_of_size(1, 60000), "image/png", 413, "height of 60000"),
        Case("16000x1 PNG", png_of_size(16000, 1), "image/png", 413, "width of 16000"),
        Case("2049x2048 PNG", png_of_size(2049, 2048), "image/png", 413, "exceeds the limit of 4194304 pixels"),
        Case("WebP declaring 16000x16000", webp_declaring(16000, 16000), "image/webp", 413, "16000x16000"),
        Case("BMP declaring 8000x8000", bmp_declaring(8000, 8000), "image/bmp", 413, "pixels"),
        Case("JPEG with 80 scans", jpeg_with_scans(80), "image/jpeg", 413, "80 scans"),
        Case("MPO with 1500 scans", mpo_with_scans(1500), "image/jpeg", 413, "1500 scans"),
        Case("4000x3000 progressive MPO", mpo([Image.new("RGB", (4000, 3000)), Image.new("RGB", (8, 8))], quality=10, progressive=True), "image/jpeg", 413, "4000x3000 pixels"),
        Case("PNG of zTXt bombs", png_with_text_bombs(900), "image/png", 413, "PNG text chunks exceed"),
        Case("float TIFF with NaN", tiff(nan_image), "image/tiff", 400, "NaN"),
        Case("float TIFF of infinity", tiff(inf_image), "image/tiff", 400, "NaN or infinity"),
        Case("float TIFF of 0..255", tiff(digit().astype(np.float32)), "image/tiff", 400, "0..1"),
        Case("int32 TIFF with negatives", tiff(np.full((28, 28), -7, np.int32)), "image/tiff", 400, "0..65535"),
        Case("ICO image", other_format("ICO"), "image/x-icon", 400, "ICO images are not accepted"),
        Case("PPM image", other_format("PPM"), "application/octet-stream", 400, "PPM images are not accepted"),
        Case("TGA image", other_format("TGA"), "application/octet-stream", 400, "not accepted"),
        Case("PDF document", other_format("PDF"), "application/pdf", 400, "PDF images are not accepted"),
        Case("SVG drawing", b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "image/svg+xml", 400, "SVG images are not accepted"),
        Case("deeply nested JSON", b"[" * 200_000 + b"]" * 200_000, "application/json", 400, "nested too deeply"),
        Case("deeply nested JSON object", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json", 400, "nested too deeply"),
        Case("pixel of 400 digits", json.dumps({"pixels": [[int("9" * 400)] * 28] * 28}).encode(), "application/json", 400, "0..255"),
        Case("pixel of 5000 digits", b'{"pixels": [[' + b"9" * 5000 + b"]]}", "application/json", 400, "malformed JSON"),
        Case("NaN token in pixels", b'{"pixels": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]}", "application/json", 400, "NaN"),
        Case("1e999 in pixels", b'{"pixels": [' + b",".join([b"[" + b",".join([b"1e999"] * 28) + b"]"] * 28) + b"]}", "application/json", 400, "infinity"),
        Case("a MiB of empty JSON objects", b"[" + b"{}," * 349_000 + b"{}]", "application/json", 400, "got a JSON list"),
        Case("many JSON keys", json.dumps({f"key{i}": i for i in range(20000)}).encode(), "application/json", 400, "and 19992 more"),
        Case("data URL without base64", b'{"image": "data:image/png,abc"}', "application/json", 400, "must be base64"),
        Case("truncated GIF", animated("GIF", [digit()])[:40], "image/gif", 400, "truncated or corrupt"),
        Case("truncated TIFF", tiff(digit())[:200], "image/tiff", 400, "truncated or corrupt"),
        Case("random bytes", np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "application/octet-stream", 400, "not an image"),
    ]


def bad_requests() -> list[tuple[str, bytes, str, int, str]]:
    """(name, body, content type, expected status, words in the error)."""
    rng = np.random.default_rng(7)
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 9:19] = 200
    png = encode_image(digit, "PNG")
    bomb = png_declaring(20000, 20000)
    pixels = digit.tolist()
    return [
        ("empty body", b"", "application/octet-stream", 400, "empty"),
        ("truncated PNG", png[: len(png) // 2], "image/png", 400, "truncated"),
        ("random bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "application/octet-stream", 400, "not an image"),
        ("decompression bomb", bomb, "image/png", 413, "decompression bomb"),
        ("too many pixels", png_declaring(5000, 5000), "image/png", 413, "exceeds the limit"),
        # refused by TorchServe's frontend (max_request_size) before the handler: no JSON body
        ("over 1 MiB", rng.integers(0, 256, 1_100_000, dtype=np.uint8).tobytes(), "application/octet-stream", 413, None),
        ("malformed JSON", b'{"pixels": [[1, 2', "application/json", 400, "malformed JSON"),
        ("JSON array", b"[1, 2, 3]", "application/json", 400, "JSON object"),
        ("NaN pixels", json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(), "application/json", 400, "NaN"),
        ("pixels out of range", json.dumps({"pixels": [[256] * 28] * 28}).encode(), "application/json", 400, "0..255"),
        ("negative pixels", json.dumps({"pixels": [[-3] * 28] * 28}).encode(), "application/json", 400, "0..255"),
        ("wrong shape", json.dumps({"pixels": pixels[:20]}).encode(), "application/json", 400, "28 rows of 28"),
        ("flat pixels", json.dumps({"pixels": sum(pixels, [])}).encode(), "application/json", 400, "flat list"),
        ("string pixels", json.dumps({"pixels": [["1"] * 28] * 28}).encode(), "application/json", 400, "no strings"),
        ("bad base64", b'{"image": "%%%"}', "application/json", 400, "base64"),
        ("base64 of garbage", json.dumps({"image": base64.b64encode(b"garbage").decode()}).encode(), "application/json", 400, "not an image"),
        ("unknown keys", b'{"img": "x"}', "application/json", 400, "exactly one"),
        ("plain text", b"hello", "text/plain", 400, "got text that is not an image"),
        ("form post", b"a=b", "application/x-www-form-urlencoded", 400, "Content-Type"),
    ]


def reset_peak_memory(pid: int | str = "self") -> int:
    """Reset the kernel's peak-RSS mark of `pid` (writing 5 to clear_refs); return its RSS now."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status_kib(pid, "VmRSS") * 1024


def peak_memory(pid: int | str = "self") -> int:
    """The highest RSS of `pid` since the last reset, in bytes."""
    return _status_kib(pid, "VmHWM") * 1024


def _status_kib(pid, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")
