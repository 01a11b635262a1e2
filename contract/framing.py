"""Framing: turn what people send into what the data set looks like, the way the data set was made.

numpy + Pillow only (no torch). The recipe is plain data recorded in bundle.json
(bundle["input"]["framing"]), so that the handler, the edge predictor and the browser page frame
alike; the browser page mirrors the steps below in JavaScript, so every step is specified exactly
here and uses plain float64 arithmetic (no Pillow filter inside the framing itself).

Input: a luminance image L (H x W, float64, 0..255; ITU-R 601-2 luma, Pillow's "L") and, for an
image with transparency, its alpha A (H x W, 0..1), both taken after the EXIF orientation has been
applied (contract/preprocessing.py turns the decoded arrays upright). Steps, in order:

0. Bound the cost: when max(H, W) > recipe["max_side"] (1024), k = ceil(max(H, W) / max_side)
   and L (and A) become the means of k x k blocks; the last H mod k rows and W mod k columns,
   which fill no block, are dropped.
1. Ink from alpha (only when the image has an alpha channel with at least one pixel below 1).
   The content's mean luminance m = sum(L * A) / sum(A); the image is composited over white when
   m < 127.5 (dark strokes) and over black otherwise: L = A * L + (1 - A) * background. A canvas
   export with black strokes on transparent pixels thus reads as black ink on white paper,
   whatever the stroke colour. Fully transparent (sum(A) == 0): nothing to frame.
2. Background polarity. The border ring is the outermost row and column on each side (every
   pixel with row 0 or H-1 or column 0 or W-1, each counted once; the whole image when H or W
   is 2 or less). If the median of the ring (the mean of the two middle values for an even
   count) is above recipe["polarity_threshold"] (127.5) the background is light: L = 255 - L.
3. Background level, a plane from the four sides' medians: mt, mb, ml, mr = medians of the top
   row, bottom row, left column, right column (full rows and columns); m0 = median of the ring;
   B(y, x) = m0 + (x - (W-1)/2) * (mr - ml) / max(W-1, 1) + (y - (H-1)/2) * (mb - mt) / max(H-1, 1).
   Ink I = clip(L - B, 0, 255). This removes paper colour and a linear lighting gradient.
4. Contrast. peak = max(I). If peak < recipe["min_contrast"] there is no object: framing is not
   applied (the plain square fit is used, as with framing off). Otherwise I = I / peak * 255
   (the darkest ink becomes 255).
5. The object: the bounding box of the pixels with I > recipe["object_threshold"] * 255 (paper
   texture and sensor noise stay below it): rows r0..r1, columns c0..c1 (inclusive); crop I to
   it. (Faint ink inside the box is kept: the resize below averages the noise away.)
6. Scale so that the longer side is recipe["box"] pixels, aspect kept: the other side is
   max(1, floor(short * box / long + 0.5)). Resampling is separable, a triangle (tent) filter
   scaled for antialiasing, per axis from n_in to n_out: scale = n_in / n_out,
   support = max(scale, 1); output i takes input j with weight max(0, 1 - |t|),
   t = (j + 0.5 - (i + 0.5) * scale) / support, the weights of each output normalized to sum 1.
   (The weights of Pillow's BILINEAR resize, in float64, no 8-bit rounding.) out = Wy @ crop @ Wx^T.
7. Place the h x w result in a canvas x canvas array of zeros (recipe["canvas"], 28):
   "mass": the centre of mass (cy = sum(v * (row + 0.5)) / sum(v), likewise cx) lands nearest
   the canvas centre: top = floor(canvas / 2 - cy + 0.5), left likewise, each clamped to
   0..canvas - h (resp. w); "box": top = floor((canvas - h) / 2), left = floor((canvas - w) / 2).
8. Sharpen (Fashion-MNIST's recipe sharpens; MNIST's does not: recipe["sharpen"] = 0):
   with a = recipe["sharpen"], blur = the separable 3-tap kernel [1, 2, 1] / 4 along rows, then
   along columns, the array's edge pixels repeated outside it: out = x + a * (x - blur(x)).
   Values are clipped to 0..255 and returned as float32 (no rounding to integers).

Recipes (`RECIPES`): MNIST (LeCun et al.): the digit's bounding box scaled into 20 x 20 keeping
its aspect, anti-aliased, centred by centre of mass in 28 x 28. Fashion-MNIST (Xiao et al. 2017,
arXiv:1708.07747, section 2): product photos on white trimmed, the longest edge resized to 28,
sharpened, the short edge extended to 28 with the product centred, negated, 8-bit grey; here: box
28, centred by its bounding box, a mild unsharp mask (its subsampling resize and its Gaussian
sharpening are not reproduced exactly: a triangle filter resizes, a 3 x 3 kernel sharpens).

When framing applies (`mode`): "off" never; "on" always (when an object is found); "auto" (the
default) unless the image is already in the data set's form: canvas x canvas, no transparency,
and a dark border (step 2 keeps it as it is). Such an image passes through bit-identical, so the
test-set and parity figures do not move.
"""
from __future__ import annotations

import math

import numpy as np

MODES = ("auto", "on", "off")

_COMMON = {"canvas": 28, "min_contrast": 24.0, "object_threshold": 0.1, "polarity_threshold": 127.5,
           "max_side": 1024}
RECIPES = {
    "mnist": {"name": "mnist", "box": 20, "center": "mass", "sharpen": 0.0, **_COMMON},
    # sharpen 1.5: the best of 0.5, 0.75, 1 and 1.5 on 400 paper/canvas/phone inputs of each form,
    # for two models (docs/framing.md)
    "fashion-mnist": {"name": "fashion-mnist", "box": 28, "center": "box", "sharpen": 1.5, **_COMMON},
}


class FramingError(ValueError):
    """A recipe or a requested mode that cannot be used."""


def recipe_for(dataset: str) -> dict:
    """The recipe bundle.json records for a data set (`dataset` as train/ names it)."""
    try:
        return dict(RECIPES[dataset])
    except KeyError:
        raise FramingError(f"no framing recipe for data set {dataset!r}; known: {sorted(RECIPES)}") from None


def check_mode(mode) -> str:
    """A request's framing choice ("auto", "on", "off", or None for auto), lower-cased."""
    if mode is None or mode == "":
        return "auto"
    if isinstance(mode, bool):  # JSON true/false
        return "on" if mode else "off"
    if isinstance(mode, (bytes, bytearray)):
        mode = bytes(mode).decode("utf-8", "replace")
    if isinstance(mode, str) and mode.strip().lower() in MODES:
        return mode.strip().lower()
    raise FramingError(f"framing must be one of {', '.join(MODES)} (or true/false), got {mode!r}")


def frame(gray: np.ndarray, alpha: np.ndarray | None, recipe: dict, mode: str = "auto"):
    """(H, W) luminance 0..255 (+ alpha 0..1 or None) -> ((canvas, canvas) float32 or None, report).

    None means "not framed": the caller fits the image as it did before framing existed.
    """
    mode = check_mode(mode)
    report = {"mode": mode, "applied": False}
    transparent = alpha is not None and bool((alpha < 1).any())
    if mode == "off":
        return None, report
    L, k = reduce_large(gray.astype(np.float64), recipe)
    if transparent:
        alpha, _ = reduce_large(alpha.astype(np.float64), recipe)
        L = ink_from_alpha(L, alpha.astype(np.float64))
        if L is None:
            report["reason"] = "fully transparent image"
            return None, report
        report["ink_from"] = "alpha"
    light = light_background(L, recipe)
    canvas = int(recipe["canvas"])
    if mode == "auto" and L.shape == (canvas, canvas) and not transparent and not light:
        report["reason"] = "already in the data set's form"
        return None, report
    if light:
        L = 255.0 - L
    ink = remove_background(L)
    ink = stretch_contrast(ink, recipe)
    if ink is None:
        report["reason"] = "no object found (too little contrast)"
        return None, report
    r0, r1, c0, c1 = bounding_box(ink, float(recipe["object_threshold"]) * 255.0)
    placed = place(scale_to_box(ink[r0:r1 + 1, c0:c1 + 1], int(recipe["box"])), recipe)
    framed = sharpen(placed, float(recipe["sharpen"]))
    report.update({"applied": True, "recipe": recipe["name"], "inverted": light,
                   "box": [int(c0) * k, int(r0) * k, int(c1 - c0 + 1) * k, int(r1 - r0 + 1) * k]})
    return framed, report


def reduce_large(x: np.ndarray, recipe: dict) -> tuple[np.ndarray, int]:
    """k x k block means for images beyond max_side (step 0): a 16-megapixel photo costs about
    what a 1-megapixel one does."""
    max_side = int(recipe["max_side"])
    if not max_side or max(x.shape) <= max_side:
        return x, 1
    k = math.ceil(max(x.shape) / max_side)
    h, w = x.shape[0] // k, x.shape[1] // k
    return x[:h * k, :w * k].reshape(h, k, w, k).mean(axis=(1, 3)), k


def ink_from_alpha(L: np.ndarray, A: np.ndarray) -> np.ndarray | None:
    """Composite over the background that contrasts with the content (step 1)."""
    total = A.sum()
    if total <= 0:
        return None
    background = 255.0 if (L * A).sum() / total < 127.5 else 0.0
    return A * L + (1.0 - A) * background


def border_ring(L: np.ndarray) -> np.ndarray:
    h, w = L.shape
    if h <= 2 or w <= 2:
        return L.ravel()
    return np.concatenate([L[0], L[-1], L[1:-1, 0], L[1:-1, -1]])


def light_background(L: np.ndarray, recipe: dict) -> bool:
    return bool(np.median(border_ring(L)) > float(recipe["polarity_threshold"]))


def remove_background(L: np.ndarray) -> np.ndarray:
    """Ink above a plane through the border's medians (step 3)."""
    h, w = L.shape
    m0 = np.median(border_ring(L))
    gx = (np.median(L[:, -1]) - np.median(L[:, 0])) / max(w - 1, 1)
    gy = (np.median(L[-1]) - np.median(L[0])) / max(h - 1, 1)
    ys = np.arange(h, dtype=np.float64)[:, None] - (h - 1) / 2
    xs = np.arange(w, dtype=np.float64)[None, :] - (w - 1) / 2
    return np.clip(L - (m0 + xs * gx + ys * gy), 0.0, 255.0)


def stretch_contrast(ink: np.ndarray, recipe: dict) -> np.ndarray | None:
    """Darkest ink to 255 (step 4); None when there is no object."""
    peak = float(ink.max())
    if peak < float(recipe["min_contrast"]):
        return None
    return ink / peak * 255.0


def bounding_box(ink: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """Rows r0..r1 and columns c0..c1 (inclusive) of the pixels above threshold (step 5)."""
    inside = ink > threshold
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) triangle-filter weights, antialiased when shrinking (step 6)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64)[:, None] + 0.5) * scale
    t = (np.arange(n_in, dtype=np.float64)[None, :] + 0.5 - centres) / support
    weights = np.maximum(0.0, 1.0 - np.abs(t))
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape
    return resize_weights(h, height) @ image @ resize_weights(w, width).T


def scale_to_box(crop: np.ndarray, box: int) -> np.ndarray:
    h, w = crop.shape
    long_side = max(h, w)
    height = box if h == long_side else max(1, math.floor(h * box / long_side + 0.5))
    width = box if w == long_side else max(1, math.floor(w * box / long_side + 0.5))
    return resize(crop, height, width)


def place(image: np.ndarray, recipe: dict) -> np.ndarray:
    """Put the scaled object into the canvas, centred as the recipe says (step 7)."""
    canvas = int(recipe["canvas"])
    h, w = image.shape
    if recipe["center"] == "mass" and image.sum() > 0:
        total = image.sum()
        cy = (image.sum(axis=1) * (np.arange(h) + 0.5)).sum() / total
        cx = (image.sum(axis=0) * (np.arange(w) + 0.5)).sum() / total
        top = min(max(math.floor(canvas / 2 - cy + 0.5), 0), canvas - h)
        left = min(max(math.floor(canvas / 2 - cx + 0.5), 0), canvas - w)
    elif recipe["center"] in ("box", "mass"):
        top, left = (canvas - h) // 2, (canvas - w) // 2
    else:
        raise FramingError(f"unknown centring {recipe['center']!r} in the framing recipe")
    out = np.zeros((canvas, canvas), dtype=np.float64)
    out[top:top + h, left:left + w] = image
    return out


def blur3(x: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along rows, then along columns, edges repeated (step 8)."""
    padded = np.pad(x, 1, mode="edge")
    rows = (padded[:, :-2] + 2.0 * padded[:, 1:-1] + padded[:, 2:]) / 4.0
    return (rows[:-2] + 2.0 * rows[1:-1] + rows[2:]) / 4.0


def sharpen(x: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp mask, then 0..255 as float32 (step 8)."""
    if amount:
        x = x + amount * (x - blur3(x))
    return np.clip(x, 0.0, 255.0).astype(np.float32)
