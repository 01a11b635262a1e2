"""The one preprocessing function: request body -> normalized float32 array (1, C, H, W).

numpy + Pillow only (no torch), so the TorchServe handler, the edge predictor, export's checks
and the tests all run the same code. Accepted bodies:

- image bytes in one of FORMATS (PNG, JPEG, BMP, GIF, WebP, TIFF); any mode (1, L, P, RGB, RGBA,
  LA, CMYK, 16-bit, 32-bit integer, float). Colour becomes luminance (ITU-R 601-2, Pillow's "L");
  16-bit and 32-bit integer values 0..65535 are scaled to 0..255, float values 0..1 to 0..255.
  Of an animated GIF, WebP or PNG, or a multi-page TIFF, only the first frame is read. The EXIF
  orientation is applied. Then, when bundle.json records a framing recipe, the image is framed
  the way the data set was made (contract/framing.py: background polarity, ink from alpha for
  transparent drawings, the object scaled into the recipe's box and centred); an image already in
  the data set's form passes through unchanged. Unframed (framing off, no recipe, nothing found to
  frame), transparency is composited over black (the background of MNIST-style images) and the
  image is padded with black to a square, then resized to H x W (Lanczos);
- the same bytes as base64 text or a data URL ("data:image/png;base64,..."), line breaks and
  spaces allowed (what `base64 file.png` prints);
- JSON {"image": "<base64 or data URL of image bytes>"};
- JSON {"pixels": [[H rows of W numbers in 0..255]]}: a light object on a dark background, as in
  MNIST.

A request chooses framing "auto" (the default), "on" or "off" (the `framing` argument, or a
"framing" key in a JSON body); `preprocess_framed` also returns what was done.

Cost per request is bounded by the limits below, checked before any pixel is decoded: the width
and the height each, the pixel count, the number of JPEG scans. They are decided from the bytes,
not from the name Pillow gives a file: a JPEG stream is one in every container (JFIF, EXIF, a
multi-picture MPO as phones write it, a JPEG-compressed TIFF). Pixels are then turned into grey
in strips of rows and block-averaged down to WORK_SIDE, so that working memory follows the pixels
and never the square of the long side.

Whatever cannot be used raises InvalidInput with the HTTP status to answer (400, or 413 for too
large) and a message that says what was wrong and what to send instead.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from contract import framing as framing_steps
from contract import responses

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 28x28 digit is < 1 kB; config.properties matches it
MAX_SIDE = 8192  # width and height each, checked before decoding: an 80-byte PNG can claim 60000x1
# Decoded pixels: Pillow holds up to 4 bytes per pixel and libwebp two more canvases, so a
# request's memory follows its pixels; the worst file at this limit is an RGBA WebP, then a
# progressive JPEG (figures in docs/serving.md).
MAX_PIXELS = 1 << 22
MAX_JPEG_SCANS = 64  # each progressive scan passes over the whole image; real files have ~10
WORK_SIDE = 512  # decoded images are block-averaged to at most this long side before fitting
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow's names; nothing else is opened
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
ACCEPTED = ("image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF), JSON {\"image\": \"<base64>\"}, "
            "or JSON {\"pixels\": [[...]]}")
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")
Image.init()  # every plugin registered, so that a refused format can be named
# PNG text chunks (tEXt, zTXt, iTXt) are metadata the model never sees, yet Pillow inflates them
# when it opens the file, up to 64 MiB by default: a 1 MiB body of zTXt bombs cost that much
# memory. Pillow's own limit, lowered for every PNG this process opens; one chunk (an ICC profile
# is inflated under the same limit) may still reach Pillow's 1 MiB.
PngImagePlugin.MAX_TEXT_CHUNK = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 21
_PNG_TEXT_LIMITS = ("Decompressed data too large", "Too much memory used in text chunks")


class InvalidInput(ValueError):
    """A request that cannot be turned into a model input; `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    def to_response(self) -> dict:
        return responses.error(str(self), self.status)


@dataclass(frozen=True)
class InputSpec:
    """The model input that bundle.json describes."""
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    framing: dict | None = None  # bundle.json's framing recipe; None: images are only fitted

    @classmethod
    def from_bundle(cls, bundle: dict) -> InputSpec:
        spec = bundle["input"]
        return cls(int(spec["channels"]), int(spec["height"]), int(spec["width"]),
                   tuple(float(m) for m in spec["mean"]), tuple(float(s) for s in spec["std"]),
                   spec.get("framing"))


@dataclass(frozen=True)
class DecodedImage:
    """An image file's first frame, before it is fitted to the model's input.

    gray:  (h, w) float32 luminance 0..255, transparent parts composited over black (Pillow's
           alpha_composite, then "L": the browser page does the same integer arithmetic);
    alpha: (h, w) float32 opacity 0..255, or None for an opaque image;
    luma:  (h, w) float32 luminance before compositing (framing reads ink from it), or None.
    The long side is at most WORK_SIDE (larger images are block-averaged, luma weighted by alpha).
    All are upright: the EXIF orientation (reported in `orientation`, 1 when none) is applied.
    """
    gray: np.ndarray
    alpha: np.ndarray | None
    format: str | None  # Pillow's name for the file's format
    orientation: int = 1
    luma: np.ndarray | None = None
    scale: int = 1  # pixels of the file per pixel here (the decoder's downscaling, the block means)

    def luminance_and_opacity(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(luminance 0..255 before compositing, opacity 0..1 or None), as framing wants them."""
        if self.alpha is None:
            return self.gray, None
        luma = self.gray if self.luma is None else self.luma  # decode sets luma wherever alpha is
        return luma, self.alpha / np.float32(255)


def preprocess(body, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """Any accepted request body (bytes, str, or JSON already decoded by TorchServe) -> (1,C,H,W)."""
    return preprocess_framed(body, spec, framing)[0]


def preprocess_framed(body, spec: InputSpec, framing: str | None = None) -> tuple[np.ndarray, dict]:
    """preprocess(), and what framing did ({"mode", "applied", ...}: contract/framing.py)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if body.lstrip()[:1] in (b"{", b"["):  # JSON, whatever its Content-Type said
            return preprocess_framed(_parse_json(body), spec, framing)
        return _decode_framed(_unwrap_text(body), spec, framing)
    if isinstance(body, str):
        if body.lstrip()[:1] in ("{", "["):
            return preprocess_framed(_parse_json(body.encode("utf-8", "surrogatepass")), spec, framing)
        return _decode_framed(_unwrap_text(body.encode("utf-8", "surrogatepass")), spec, framing)
    if isinstance(body, dict):
        return _from_json_object(body, spec, framing)
    kind = "null" if body is None else type(body).__name__
    raise InvalidInput(f"expected a JSON object, got a JSON {kind}; send {ACCEPTED}")


def decode_image(data: bytes, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """Image file bytes -> (1, C, H, W) float32, normalized with the spec's mean and std."""
    return _decode_framed(data, spec, framing)[0]


def _decode_framed(data: bytes, spec: InputSpec, framing: str | None) -> tuple[np.ndarray, dict]:
    image = decode(data)
    array, report = _frame(image.gray, image.luminance_and_opacity(), spec, framing)
    if "box" in report and image.scale > 1:  # the object's box in the pixels of the file as sent
        report["box"] = [v * image.scale for v in report["box"]]
    if image.orientation != 1:
        report["exif_orientation"] = image.orientation
    return array, report


def _frame(gray: np.ndarray, luma_alpha, spec: InputSpec, mode) -> tuple[np.ndarray, dict]:
    """Frame as bundle.json's recipe says, or fit as before framing existed."""
    try:
        mode = framing_steps.check_mode(mode)
    except framing_steps.FramingError as error:
        raise InvalidInput(str(error)) from None
    if spec.framing is None:
        return normalize(fit(gray, spec), spec), {"mode": mode, "applied": False,
                                                  "reason": "bundle.json has no framing recipe"}
    luma, alpha = luma_alpha if luma_alpha is not None else (gray, None)
    framed, report = framing_steps.frame(luma, alpha, spec.framing, mode)
    return normalize(fit(gray, spec) if framed is None else framed, spec), report


def decode(data: bytes) -> DecodedImage:
    """Image file bytes -> its first frame as grey (and alpha), within the limits above."""
    if len(data) == 0:
        raise InvalidInput(f"empty body: send {ACCEPTED}")
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"body of {len(data)} bytes exceeds the {MAX_BODY_BYTES}-byte limit; "
                           "send a smaller image (the model sees 28x28 pixels)", 413)
    _check_declared_webp_size(data)  # libwebp allocates its canvas when the file is opened
    if is_jpeg_stream(data):
        _check_jpeg_scans(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd files: the answer says it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                declared_width = image.width
                _check_declared_size(image, data)
                image.load()
                _check_size(image)  # a decoder may change its mind about the size
                gray, alpha, luma = _to_gray_and_alpha(image)
                orientation = _exif_orientation(image)
                def turn(values):
                    return None if values is None else _upright(values, orientation)
                scale = max(1, round(declared_width / image.width)) * _block_factor(image.size)
                return DecodedImage(turn(gray), turn(alpha), image.format, orientation, turn(luma), scale)
    except InvalidInput:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidInput(_unaccepted_format_message(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInput(f"image refused as a decompression bomb: {error}", 413) from None
    except MemoryError:
        raise InvalidInput("image needs more memory to decode than a request may use; "
                           "send a smaller image", 413) from None
    except Exception as error:  # any decoder fault is the file's: the worker and batch live on
        if isinstance(error, ValueError) and str(error).startswith(_PNG_TEXT_LIMITS):
            raise InvalidInput(f"PNG text chunks exceed {PngImagePlugin.MAX_TEXT_MEMORY} bytes "
                               f"once inflated ({_clip(str(error))}); strip the metadata (e.g. "
                               "save the image again without it)", 413) from None
        raise InvalidInput(f"image is truncated or corrupt ({type(error).__name__}: "
                           f"{_clip(str(error))}); send the complete file") from None


def fit(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Pad to a square with black, then resize to (H, W) (Lanczos); a no-op at the right size.

    The image is at most WORK_SIDE on its long side by now, so the square costs at most 1 MiB.
    The browser page (web/preprocessing.js) does the same, step for step.
    """
    h, w = gray.shape
    if (h, w) == (spec.height, spec.width):
        return gray
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = gray
    resized = Image.fromarray(square).resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 255)


def pixels_to_array(pixels, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """JSON pixel rows (0..255, light object on dark background) -> (1, C, H, W) float32."""
    return _pixels_framed(pixels, spec, framing)[0]


def _pixels_framed(pixels, spec: InputSpec, framing: str | None) -> tuple[np.ndarray, dict]:
    shape = f"{spec.height} rows of {spec.width} numbers"
    if not (isinstance(pixels, list) and len(pixels) == spec.height
            and all(isinstance(row, list) and len(row) == spec.width for row in pixels)):
        raise InvalidInput(f"\"pixels\" must be {shape} in 0..255, got {_describe_shape(pixels)}")
    values = [v for row in pixels for v in row]
    if not all(type(v) in (int, float) for v in values):
        raise InvalidInput("\"pixels\" values must be numbers in 0..255 (no strings, booleans or nulls)")
    # compared as Python numbers: a 400-digit integer must not overflow on its way into numpy
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise InvalidInput("\"pixels\" holds NaN or infinity; values must be numbers in 0..255")
    if not all(0 <= v <= 255 for v in values):
        low, high = min(values), max(values)
        raise InvalidInput(f"\"pixels\" values must lie in 0..255, got {_number(low)}..{_number(high)}")
    return _frame(np.asarray(pixels, dtype=np.float32), None, spec, framing)


def normalize(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) values in 0..255 -> (1, C, H, W) float32: (x / 255 - mean) / std per channel."""
    x = gray.astype(np.float32) / np.float32(255.0)
    channels = [(x - np.float32(m)) / np.float32(s) for m, s in zip(spec.mean, spec.std)]
    return np.stack(channels)[np.newaxis].astype(np.float32, copy=False)


# --- limits, checked on what the file declares ------------------------------------------------

def _check_declared_size(image: Image.Image, data: bytes) -> None:
    """Width, height and pixels as the file declares them, before any pixel is decoded."""
    _check_sides(image)
    if jpeg_frame_is_progressive(data) is False and not image.info.get("progressive"):
        # libjpeg scales a baseline JPEG down by up to 8 while decoding: the pixel limit applies
        # to that (progressive JPEGs keep every coefficient in memory, so theirs to the file's).
        # Decided from the bytes, so that every container of a JPEG stream (JFIF, EXIF, MPO)
        # is treated alike, whatever name Pillow gives it (and only if Pillow's own reading of
        # the frame header agrees).
        # The mode stays: decoding straight to "L" takes the JPEG's own luma, up to 10 grey levels
        # away from RGB -> L, which the browser page and every other decoder compute.
        image.draft(None, _scaled_to(*image.size, WORK_SIDE))
    _check_size(image)
    if image.format == "TIFF" and image.info.get("compression") in ("jpeg", "tiff_jpeg"):
        _check_jpeg_scans(data)  # libtiff hands each strip to libjpeg: the same cost per scan


def is_jpeg_stream(data: bytes) -> bool:
    """A JPEG stream starts here (SOI and a marker): JFIF, EXIF, MPO, progressive, arithmetic."""
    return data[:3] == b"\xff\xd8\xff"


def jpeg_frame_is_progressive(data: bytes) -> bool | None:
    """Whether the first frame of a JPEG stream is progressive (SOF2, SOF6, SOF10, SOF14), read
    by walking its marker segments; None when `data` is no JPEG stream or has no frame header
    before its first scan. The page's decodeRgba (web/preprocessing.js) walks them alike."""
    if not is_jpeg_stream(data):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return marker in (0xC2, 0xC6, 0xCA, 0xCE)
        if marker in (0xDA, 0xD9):
            return None
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def _check_jpeg_scans(data: bytes) -> None:
    """Each progressive scan passes over the whole image: refuse many before decoding any.

    Counted over the whole body (0xFF is escaped in scan data, so a start-of-scan marker cannot
    hide there), which covers every picture of an MPO and every strip of a JPEG-compressed TIFF.
    """
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidInput(f"JPEG with {scans} scans exceeds the limit of {MAX_JPEG_SCANS}; "
                           "save it as a baseline JPEG or PNG", 413)


def _check_size(image: Image.Image) -> None:
    _check_sides(image)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidInput(f"image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} "
                           "pixels; downscale it first", 413)


def _check_sides(image: Image.Image) -> None:
    width, height = image.size
    for name, side in (("width", width), ("height", height)):
        if side > MAX_SIDE:
            raise InvalidInput(f"image {name} of {side} pixels ({width}x{height}) exceeds the limit "
                               f"of {MAX_SIDE}; downscale it first", 413)


def _check_declared_webp_size(data: bytes) -> None:
    """The canvas size a WebP file declares, read from its first chunk before libwebp allocates it."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or len(data) < 30:
        return
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    else:
        return
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InvalidInput(f"WebP image of {width}x{height} pixels exceeds the limits ({MAX_SIDE} "
                           f"per side, {MAX_PIXELS} pixels); downscale it first", 413)


def _scaled_to(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, int(width * scale)), max(1, int(height * scale))


# --- pixels -> grey, in strips ----------------------------------------------------------------

def _to_gray_and_alpha(image: Image.Image):
    """The loaded image -> (grey composited over black, alpha or None, luminance before
    compositing or None), long side <= WORK_SIDE.

    Rows are converted a strip at a time and block-averaged at once, so that the extra memory
    is a strip's, whatever the image's shape.
    """
    width, height = image.size
    factor = _block_factor(image.size)
    rows_per_strip = factor * max(1, (1 << 18) // (factor * width))
    grays, alphas, lumas = [], [], []
    for top in range(0, height, rows_per_strip):
        strip = image.crop((0, top, width, min(height, top + rows_per_strip)))
        gray, alpha, luma = _strip_to_gray(strip)
        grays.append(_block_mean(gray, factor))  # composited over black: a premultiplied mean
        if alpha is not None:
            alphas.append(_block_mean(alpha, factor))
            lumas.append(luma if factor == 1 else _block_mean(luma * alpha, factor))
    gray = np.concatenate(grays)
    if not alphas:
        return gray, None, None
    alpha, luma = np.concatenate(alphas), np.concatenate(lumas)
    if factor > 1:  # the alpha-weighted mean luminance of each block
        luma = np.where(alpha > 0, luma / np.maximum(alpha, np.float32(1e-6)), 0).astype(np.float32)
    return gray, alpha, luma


def _block_factor(size: tuple[int, int]) -> int:
    """Side of the blocks that bring the long side to WORK_SIDE or less (1: none)."""
    return max(1, -(-max(size) // WORK_SIDE))


def _strip_to_gray(strip: Image.Image):
    """Rows of any mode -> float32 luminance 0..255 composited over black, and for a transparent
    image its alpha and its luminance before compositing (else None, None)."""
    mode = strip.mode
    if mode in SIXTEEN_BIT_MODES:
        return np.asarray(strip, dtype=np.float32) * np.float32(255 / 65535), None, None
    if mode == "I":
        values = np.asarray(strip)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InvalidInput(f"32-bit integer image holds values {values.min()}..{values.max()}; "
                               "they must lie in 0..65535 (or send an 8-bit image)")
        return values.astype(np.float32) * np.float32(255 / 65535), None, None
    if mode == "F":
        values = np.asarray(strip, dtype=np.float32)
        if not np.isfinite(values).all():
            raise InvalidInput("float image holds NaN or infinity; send finite values in 0..1 "
                               "(or an 8-bit image)")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise InvalidInput(f"float image holds values {values.min():g}..{values.max():g}; "
                               "they must lie in 0..1 (or send an 8-bit image)")
        return values * np.float32(255), None, None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in strip.info:
        rgba = strip.convert("RGBA")
        luma_alpha = np.asarray(rgba.convert("LA"), dtype=np.float32)
        over_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return np.asarray(over_black.convert("L"), np.float32), luma_alpha[..., 1], luma_alpha[..., 0]
    if mode != "L":
        try:
            strip = strip.convert("L")
        except ValueError:
            raise InvalidInput(f"images of mode {mode} are not supported; send an RGB or grey "
                               "image") from None
    return np.asarray(strip, dtype=np.float32), None, None


def _block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks; partial blocks at the edges average what they hold."""
    if factor == 1:
        return values
    h, w = values.shape
    rows, cols = -(-h // factor), -(-w // factor)
    padded = np.zeros((rows * factor, cols * factor), np.float32)
    padded[:h, :w] = values
    counts = np.zeros_like(padded)
    counts[:h, :w] = 1
    sums = padded.reshape(rows, factor, cols, factor).sum(axis=(1, 3))
    return sums / counts.reshape(rows, factor, cols, factor).sum(axis=(1, 3))


# EXIF orientation -> the numpy operation that shows the image upright (PIL's exif_transpose)
_UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T,
            8: lambda a: np.rot90(a, 1)}


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable."""
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        return 1
    return orientation if orientation in _UPRIGHT else 1


def _upright(values: np.ndarray, orientation: int) -> np.ndarray:
    """Turned on the reduced arrays, not the decoded image: memory stays bounded."""
    turn = _UPRIGHT.get(orientation)
    return values if turn is None else np.ascontiguousarray(turn(values))


# --- text and JSON ----------------------------------------------------------------------------

def _unwrap_text(body: bytes) -> bytes:
    """A data URL or base64 text -> the bytes it carries; image bytes pass through."""
    head = body[:64].lstrip()
    if head[:5].lower() == b"data:":
        return _decode_data_url(body.strip().decode("ascii", "replace"))
    if _looks_like_image(body) or not _BASE64_TEXT.fullmatch(body):
        return body
    try:
        return _decode_base64(body.decode("ascii"), "the body")
    except InvalidInput as error:
        if error.status == 413:
            raise
        return body  # not base64 after all: decode() says what the body looks like


def _looks_like_image(data: bytes) -> bool:
    return any(_accepts(name, data[:32]) for name in FORMATS)


def _accepts(name: str, prefix: bytes) -> bool:
    accept = Image.OPEN.get(name, (None, None))[1]
    try:
        return bool(accept and accept(prefix))
    except Exception:  # a plugin's prefix check on a short or odd prefix
        return False


def _unaccepted_format_message(data: bytes) -> str:
    seen = next((name for name in Image.OPEN if name not in FORMATS and _accepts(name, data[:32])), None)
    stripped = data[:256].lstrip().lower()
    if seen is None and stripped.startswith(b"%pdf"):
        seen = "PDF"
    elif seen is None and (stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped)):
        seen = "SVG"
    if seen:
        return (f"the body looks like {seen}, and {seen} images are not accepted; convert "
                f"it to PNG (or JPEG, BMP, GIF, WebP, TIFF) and send that, or send {ACCEPTED}")
    text = data[:64].decode("utf-8", "strict") if _is_text(data[:64]) else None
    if text is not None:
        return (f"got text that is not an image, JSON, a data URL or base64 of an image "
                f"(it starts {_clip(text, 20)!r}); send {ACCEPTED}")
    return f"body is not an image in an accepted format (it starts {data[:8].hex(' ')}); send {ACCEPTED}"


def _is_text(data: bytes) -> bool:
    try:
        return data.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def _parse_json(data: bytes):
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"JSON body of {len(data)} bytes exceeds the {MAX_BODY_BYTES}-byte limit", 413)
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidInput("JSON nested too deeply; send a flat JSON object: "
                           f"{ACCEPTED}") from None
    except (ValueError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError, digit limits
        raise InvalidInput(f"malformed JSON ({_clip(str(error))}); send {ACCEPTED}") from None


def _from_json_object(obj: dict, spec: InputSpec, framing: str | None = None) -> tuple[np.ndarray, dict]:
    framing = obj.get("framing", framing)  # the body's own choice wins over a header's
    keys = {"image", "pixels"} & obj.keys()
    if len(keys) != 1:
        shown = ", ".join(_clip(repr(k), 30) for k in sorted(map(str, obj))[:8])
        more = f" and {len(obj) - 8} more" if len(obj) > 8 else ""
        raise InvalidInput("JSON must have exactly one of the keys \"image\" (base64 image bytes) "
                           f"or \"pixels\" ({spec.height}x{spec.width} numbers); got keys [{shown}]{more}")
    if "pixels" in keys:
        return _pixels_framed(obj["pixels"], spec, framing)
    encoded = obj["image"]
    if not isinstance(encoded, str):
        raise InvalidInput("\"image\" must be a base64 string of the image file's bytes")
    if encoded.lstrip()[:5].lower() == "data:":  # a data URL from a browser
        return _decode_framed(_decode_data_url(encoded.strip()), spec, framing)
    return _decode_framed(_decode_base64(encoded, "\"image\""), spec, framing)


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidInput("a data URL must be base64: data:image/png;base64,<base64 of the file>")
    return _decode_base64(payload, "the data URL")


def _decode_base64(text: str, what: str) -> bytes:
    """Standard or URL-safe base64; whitespace and line breaks ignored, padding optional."""
    if len(text) > MAX_BODY_BYTES * 4 // 3 + 4 + len(text) // 60 * 2:  # room for line breaks
        raise InvalidInput(f"{what} exceeds the {MAX_BODY_BYTES}-byte limit once decoded", 413)
    compact = "".join(text.split())
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{what} is not valid base64 ({error}); send the base64 text of the "
                           "image file's bytes") from None


def _describe_shape(value) -> str:
    if not isinstance(value, list):
        return f"a {type(value).__name__}"
    rows = len(value)
    widths = sorted({len(r) if isinstance(r, list) else -1 for r in value})
    if widths == [-1]:
        return f"a flat list of {rows} values"
    shown = "/".join(str(w) if w >= 0 else "non-list" for w in widths[:5])
    return f"{rows} rows of {shown}{'/...' if len(widths) > 5 else ''} values"


def _number(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value) if abs(value) < 10 ** 12 else "a huge number"
    return text


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
