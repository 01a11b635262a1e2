"""The one preprocessing function: request body -> normalized float32 array (1, C, H, W).

numpy + Pillow only (no torch), so the TorchServe handler, the edge predictor, export's checks
and the tests all run the same code. Accepted bodies:

- image bytes: PNG, JPEG, BMP, GIF, WebP, TIFF, ...; any size; any mode (1, L, P, RGB, RGBA, LA,
  I;16, I, F, CMYK, ...). Colour becomes luminance (ITU-R 601-2, Pillow's "L"); 16-bit values
  are scaled to 0..255. Unframed (framing off, no recipe, nothing found to frame): transparency
  is composited over black (the background of MNIST-style images) and a non-square image is
  padded with black to a square, then resized to H x W.
- JSON {"image": "<base64 of image bytes>"} (a "data:image/...;base64," prefix is allowed);
- JSON {"pixels": [[H rows of W numbers in 0..255]]}: a light object on a dark background, as in
  MNIST.

The EXIF orientation is applied right after decoding. Then, when bundle.json records a framing
recipe, the image is framed the way the data set was made (contract/framing.py: background
polarity, ink from alpha for transparent drawings, the object scaled into the recipe's box and
centred); an image already in the data set's form passes through unchanged. A request chooses
framing "auto" (the default), "on" or "off" (the `framing` argument, or a "framing" key in a JSON
body); `preprocess_framed` also returns what was done.

Whatever cannot be used raises InvalidInput with the HTTP status to answer (400, or 413 for too
large) and a message that says what was wrong and what to send instead.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract import framing as framing_steps
from contract import responses

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 28x28 digit is < 1 kB; config.properties matches it
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded size limit: a 1 MiB PNG can inflate to gigabytes
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ACCEPTED = ("image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF), JSON {\"image\": \"<base64>\"}, "
            "or JSON {\"pixels\": [[...]]}")


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
    def from_bundle(cls, bundle: dict) -> "InputSpec":
        spec = bundle["input"]
        return cls(int(spec["channels"]), int(spec["height"]), int(spec["width"]),
                   tuple(float(m) for m in spec["mean"]), tuple(float(s) for s in spec["std"]),
                   spec.get("framing"))


def preprocess(body, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """Any accepted request body (bytes, str, or JSON already decoded by TorchServe) -> (1,C,H,W)."""
    return preprocess_framed(body, spec, framing)[0]


def preprocess_framed(body, spec: InputSpec, framing: str | None = None) -> tuple[np.ndarray, dict]:
    """preprocess(), and what framing did ({"mode", "applied", ...}: contract/framing.py)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if body.lstrip()[:1] in (b"{", b"["):  # JSON, whatever its Content-Type said
            return preprocess_framed(_parse_json(body), spec, framing)
        return _decode_framed(body, spec, framing)
    if isinstance(body, str):
        if body.lstrip()[:1] in ("{", "["):
            return preprocess_framed(_parse_json(body.encode("utf-8")), spec, framing)
        raise InvalidInput(f"got text that is not JSON; send {ACCEPTED}")
    if isinstance(body, dict):
        return _from_json_object(body, spec, framing)
    if body is None:
        raise InvalidInput("empty request (a form-encoded POST arrives empty): send the image "
                           "with Content-Type: application/octet-stream or the image's own type")
    raise InvalidInput(f"expected a JSON object, got a JSON {type(body).__name__}; send {ACCEPTED}")


def decode_image(data: bytes, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """Image file bytes -> (1, C, H, W) float32, normalized with the spec's mean and std."""
    return _decode_framed(data, spec, framing)[0]


def _decode_framed(data: bytes, spec: InputSpec, framing: str | None) -> tuple[np.ndarray, dict]:
    if len(data) == 0:
        raise InvalidInput(f"empty body: send {ACCEPTED}")
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"body of {len(data)} bytes exceeds the {MAX_BODY_BYTES}-byte limit; "
                           f"send a smaller image (the model sees {spec.width}x{spec.height})", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise InvalidInput(
                        f"image of {image.width}x{image.height} pixels exceeds the limit of "
                        f"{MAX_IMAGE_PIXELS} pixels; downscale it first", 413)
                image.load()
                image, orientation = framing_steps.upright(image)
                gray, luma_alpha = _to_gray(image), _luma_and_alpha(image)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInput(f"image refused as a decompression bomb: {error}", 413) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"body is not an image that Pillow can decode; send {ACCEPTED}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInput(f"image is truncated or corrupt ({error}); send the complete file") from None
    array, report = _frame(gray, luma_alpha, spec, framing)
    if orientation != 1:
        report["exif_orientation"] = orientation
    return array, report


def pixels_to_array(pixels, spec: InputSpec, framing: str | None = None) -> np.ndarray:
    """JSON pixel rows (0..255, light object on dark background) -> (1, C, H, W) float32."""
    return _pixels_framed(pixels, spec, framing)[0]


def _pixels_framed(pixels, spec: InputSpec, framing: str | None) -> tuple[np.ndarray, dict]:
    shape = f"{spec.height} rows of {spec.width} numbers"
    if not (isinstance(pixels, list) and len(pixels) == spec.height
            and all(isinstance(row, list) and len(row) == spec.width for row in pixels)):
        raise InvalidInput(f"\"pixels\" must be {shape} in 0..255, got {_describe_shape(pixels)}")
    if not all(type(v) in (int, float) for row in pixels for v in row):
        raise InvalidInput("\"pixels\" values must be numbers in 0..255 (no strings, booleans or nulls)")
    array = np.asarray(pixels, dtype=np.float64)
    if not np.isfinite(array).all():
        raise InvalidInput("\"pixels\" holds NaN or infinity; values must be numbers in 0..255")
    if array.min() < 0 or array.max() > 255:
        raise InvalidInput(f"\"pixels\" values must lie in 0..255, got {array.min():g}..{array.max():g}")
    return _frame(array.astype(np.float32), None, spec, framing)


def normalize(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) values in 0..255 -> (1, C, H, W) float32: (x / 255 - mean) / std per channel."""
    x = gray.astype(np.float32) / np.float32(255.0)
    channels = [(x - np.float32(m)) / np.float32(s) for m, s in zip(spec.mean, spec.std)]
    return np.stack(channels)[np.newaxis].astype(np.float32, copy=False)


def _parse_json(data: bytes):
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"JSON body of {len(data)} bytes exceeds the {MAX_BODY_BYTES}-byte limit", 413)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"malformed JSON ({error}); send {ACCEPTED}") from None


def _frame(gray: np.ndarray, luma_alpha, spec: InputSpec, mode) -> tuple[np.ndarray, dict]:
    """Frame as bundle.json's recipe says, or fit as before framing existed."""
    try:
        mode = framing_steps.check_mode(mode)
    except framing_steps.FramingError as error:
        raise InvalidInput(str(error)) from None
    if spec.framing is None:
        return normalize(_fit(gray, spec), spec), {"mode": mode, "applied": False,
                                                   "reason": "bundle.json has no framing recipe"}
    luma, alpha = luma_alpha if luma_alpha is not None else (gray, None)
    framed, report = framing_steps.frame(luma, alpha, spec.framing, mode)
    return normalize(_fit(gray, spec) if framed is None else framed, spec), report


def _from_json_object(obj: dict, spec: InputSpec, framing: str | None = None) -> tuple[np.ndarray, dict]:
    framing = obj.get("framing", framing)  # the body's own choice wins over a header's
    keys = {"image", "pixels"} & obj.keys()
    if len(keys) != 1:
        raise InvalidInput("JSON must have exactly one of the keys \"image\" (base64 image bytes) "
                           f"or \"pixels\" ({spec.height}x{spec.width} numbers); got keys {sorted(obj)}")
    if "pixels" in keys:
        return _pixels_framed(obj["pixels"], spec, framing)
    encoded = obj["image"]
    if not isinstance(encoded, str):
        raise InvalidInput("\"image\" must be a base64 string of the image file's bytes")
    if encoded.startswith("data:") and "," in encoded:  # a data URL from a browser
        encoded = encoded.split(",", 1)[1]
    if len(encoded) > MAX_BODY_BYTES * 4 // 3 + 4:
        raise InvalidInput(f"\"image\" exceeds the {MAX_BODY_BYTES}-byte limit once decoded", 413)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"\"image\" is not valid base64 ({error})") from None
    return _decode_framed(data, spec, framing)


def _to_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W) float32 luminance in 0..255."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.clip(np.asarray(image, dtype=np.float32) * np.float32(255.0 / 65535.0), 0, 255)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 255)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def _luma_and_alpha(image: Image.Image):
    """(luminance 0..255, alpha 0..1) before compositing, for framing; None without transparency."""
    if not (image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info):
        return None
    rgba = image.convert("RGBA")
    return (np.asarray(rgba.convert("L"), dtype=np.float64),
            np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0)


def _fit(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Pad to a square with black, then resize to (H, W); a no-op for images of the right size."""
    h, w = gray.shape
    if (h, w) == (spec.height, spec.width):
        return gray
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = gray
    resized = Image.fromarray(square).resize((spec.width, spec.height),
                                                      Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 255)


def _describe_shape(value) -> str:
    if not isinstance(value, list):
        return f"a {type(value).__name__}"
    rows = len(value)
    widths = sorted({len(r) if isinstance(r, list) else -1 for r in value})
    if widths == [-1]:
        return f"a flat list of {rows} values"
    return f"{rows} rows of {'/'.join(str(w) if w >= 0 else 'non-list' for w in widths)} values"
