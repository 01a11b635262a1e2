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
   3a, 3b (recipes with "opening", the MNIST one: handwriting on a page). The background left
   after the plane is taken off by an opening (subtract_opening), then printed lines, rows and
   columns of ink across most of the image, lose their own level (remove_lines).
4. Contrast. peak = max(I). If peak < recipe["min_contrast"] there is no object: framing is not
   applied (the plain square fit is used, as with framing off). Otherwise I = I / peak * 255
   (the darkest ink becomes 255).
   4a (recipes with "cells"). Only the writing's connected components are kept: the heaviest
   one clear of the image's edge and the strokes near it (keep_the_writing).
5. The object: the bounding box of the pixels with I > recipe["object_threshold"] * 255 (paper
   texture and sensor noise stay below it): rows r0..r1, columns c0..c1 (inclusive); crop I to
   it. (Faint ink inside the box is kept: the resize below averages the noise away.)
   5a (recipes with "stroke_width"). A crop of at least twice the box whose stroke width is
   outside the recipe's tolerance is widened or thinned towards it (normalize_stroke_width).
   Each of these steps is specified exactly in its function's docstring; all are min/max,
   medians, counts and sums, so the browser's copy gives the same values.
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
# Cleaning the page around handwriting (steps 3a-3b, 4a, 5a): printed lines, shadows, paper dots,
# pen width. Only for data sets of strokes: a solid object (a shirt) is no thin stroke, and an
# opening would take it for the background.
_HANDWRITING = {
    "opening": 0.4,            # 3a: background = opening with a window this fraction of the short side
    "line_coverage": 0.75,     # 3b: a row/column is a printed line where this fraction of it is ink
    "line_threshold": 0.05,    # 3b: ... ink above this fraction of the peak
    "line_window": 0.25,       # 3b: the line's own level: the minimum over this fraction of the side
    "cells": 128,              # 4a: components are found on a grid at most this many cells a side
    "cell_threshold": 0.2,     # 4a: a cell is ink where its mean is above this fraction of 255
    "component_mass": 0.08,    # 4a: lighter components than this fraction of the heaviest are dropped
    "component_gap": 0.25,     # 4a: ... and those farther than this fraction of its longer side
    # 5a: stroke width in pixels of the box, 2 area / perimeter of the ink above half the peak,
    # measured on the crop before it is scaled (at 28 x 28 the jagged outline reads ~25% thinner:
    # the font stand-in measures 3.1 there and 4.2 on its paper photos). MNIST's strokes are ~2-3
    # px of the 20-px box; re-measure with measure_stroke_width on upscaled MNIST where present.
    "stroke_width": 3.5,
    "stroke_tolerance": 1.6,   # 5a: widths within target / 1.6 .. target * 1.6 are left alone
}
RECIPES = {
    "mnist": {"name": "mnist", "box": 20, "center": "mass", "sharpen": 0.0, **_COMMON, **_HANDWRITING},
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
    cleaning = {}
    if recipe.get("opening"):  # a recipe for solid objects (Fashion-MNIST) has no page cleaning
        ink = subtract_opening(ink, float(recipe["opening"]))
        ink, cleaning["lines_removed"] = remove_lines(ink, recipe)
    ink = stretch_contrast(ink, recipe)
    if ink is None:
        report["reason"] = "no object found (too little contrast)"
        return None, report
    if recipe.get("cells"):
        ink, cleaning["components"] = keep_the_writing(ink, recipe)
    threshold = float(recipe["object_threshold"]) * 255.0
    r0, r1, c0, c1 = bounding_box(ink, threshold)
    crop = ink[r0:r1 + 1, c0:c1 + 1]
    if recipe.get("stroke_width"):
        crop, cleaning["stroke_width"] = normalize_stroke_width(crop, recipe)
    placed = place(scale_to_box(crop, int(recipe["box"])), recipe)
    framed = sharpen(placed, float(recipe["sharpen"]))
    report.update({"applied": True, "recipe": recipe["name"], "inverted": light,
                   "box": [int(c0) * k, int(r0) * k, int(c1 - c0 + 1) * k, int(r1 - r0 + 1) * k], **cleaning})
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


# ---- cleaning the page around handwriting (steps 3a, 3b, 4a, 5a) -------------------------------

def running(x: np.ndarray, radius: int, op) -> np.ndarray:
    """Minimum (op=np.minimum) or maximum (np.maximum) over the window x-r..x+r along the last
    axis of a 2-D array, pixels outside it ignored: van Herk / Gil-Werman, three operations a
    pixel whatever the window (worked along the first axis, where numpy runs them in bulk)."""
    if radius < 1:
        return x.copy()
    columns = np.ascontiguousarray(x.T)
    k = 2 * radius + 1
    n, m = columns.shape
    padded_length = -(-(n + 2 * radius) // k) * k
    padded = np.full((padded_length, m), np.inf if op is np.minimum else -np.inf)
    padded[radius:radius + n] = columns
    blocks = padded.reshape(padded_length // k, k, m)
    forward = op.accumulate(blocks, axis=1).reshape(padded.shape)
    backward = op.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].reshape(padded.shape)
    return np.ascontiguousarray(op(backward[:n], forward[2 * radius:2 * radius + n]).T)


def square_filter(x: np.ndarray, radius: int, op) -> np.ndarray:
    """A (2r+1) x (2r+1) minimum or maximum: along rows, then along columns."""
    return running(running(x, radius, op).T, radius, op).T


def subtract_opening(ink: np.ndarray, fraction: float) -> np.ndarray:
    """Step 3a. What is left of the page after the plane (a shadow, a vignette, tint, stains) is
    broad; strokes are thin. The opening (minimum, then maximum, over a square window of
    `fraction` of the short side) keeps what is broader than the window, the background, and
    the ink is what rises above it. The residual's median (the paper, most of the image) is
    subtracted too: on a noisy page the opening follows the noise's troughs."""
    radius = math.floor(fraction * min(ink.shape) / 2)
    if radius < 1:
        return ink
    residual = ink - square_filter(square_filter(ink, radius, np.minimum), radius, np.maximum)
    return np.clip(residual - np.median(residual), 0.0, 255.0)


def remove_lines(ink: np.ndarray, recipe: dict) -> tuple[np.ndarray, int]:
    """Step 3b. Printed lines (ruled and squared paper, boxes of a form) are rows or columns
    that are ink over most of their length (recipe["line_coverage"]; a digit spans less). On
    those rows, then those columns, the line's own level, the minimum over a window of
    recipe["line_window"] of the side along the line, is subtracted: the line goes, and where
    a stroke crosses it the stroke stays. Returns the ink and the number of lines removed."""
    peak = float(ink.max())
    if peak <= 0:
        return ink, 0
    threshold = float(recipe["line_threshold"]) * peak
    out, removed = ink.copy(), 0
    for axis_view in (lambda a: a, lambda a: a.T):  # rows, then columns (views: writes go through)
        view = axis_view(out)
        counts = (view > threshold).sum(axis=1)
        found = counts >= float(recipe["line_coverage"]) * view.shape[1]
        removed += int(found.sum())
        # a printed line is blurred over its neighbours by the lens and the file's compression
        near = found.copy()
        near[1:] |= found[:-1]
        near[:-1] |= found[1:]
        lines = np.flatnonzero(near)
        if len(lines):
            radius = math.floor(float(recipe["line_window"]) * view.shape[1] / 2)
            view[lines] = np.clip(view[lines] - running(view[lines], radius, np.minimum), 0.0, 255.0)
    return out, removed


def keep_the_writing(ink: np.ndarray, recipe: dict) -> tuple[np.ndarray, list[int]]:
    """Step 4a. Paper dots, specks and a neighbour's scribble are apart from the writing; the
    strokes of one digit are near each other. On a grid of cells (c x c pixels, c = ceil(long
    side / recipe["cells"])), a cell is ink where its mean is above recipe["cell_threshold"] *
    255; 8-connected cells are components, weighed by their cells' ink. Kept: the heaviest of
    those that do not touch the image's edge (of all, when every one does) and every component at least recipe["component_mass"] of its weight within
    recipe["component_gap"] of its longer side (box to box, in cells) that does not touch the
    image's edge (what is left of a shadow's or the page's edge does); the ink elsewhere,
    beyond one cell around the kept ones, is cleared. Returns the ink and [kept, found]."""
    h, w = ink.shape
    c = -(-max(h, w) // int(recipe["cells"]))
    gh, gw = -(-h // c), -(-w // c)
    sums = np.zeros((gh * c, gw * c))
    sums[:h, :w] = ink
    sums = sums.reshape(gh, c, gw, c).sum(axis=(1, 3))
    counts = np.zeros((gh * c, gw * c))
    counts[:h, :w] = 1
    counts = counts.reshape(gh, c, gw, c).sum(axis=(1, 3))
    on = sums / counts > float(recipe["cell_threshold"]) * 255.0
    labels, boxes, masses = label_cells(on, sums)
    if not masses:
        return ink, [0, 0]
    # what touches the image's edge is more often a shadow's or the page's edge than writing
    at_edge = [y0 == 0 or x0 == 0 or y1 == gh - 1 or x1 == gw - 1 for y0, y1, x0, x1 in boxes]
    inside = [mass if not edge else -1.0 for mass, edge in zip(masses, at_edge)]
    main = int(np.argmax(inside)) if max(inside) > 0 else int(np.argmax(masses))
    my0, my1, mx0, mx1 = boxes[main]
    gap = float(recipe["component_gap"]) * max(my1 - my0 + 1, mx1 - mx0 + 1)
    keep = np.zeros(len(masses) + 1, dtype=bool)
    for i, ((y0, y1, x0, x1), mass) in enumerate(zip(boxes, masses)):
        distance = max(y0 - my1, my0 - y1, x0 - mx1, mx0 - x1, 0)
        keep[i + 1] = i == main or (mass >= float(recipe["component_mass"]) * masses[main] and distance <= gap
                                    and not at_edge[i])
    kept_cells = square_filter(keep[labels].astype(np.float64), 1, np.maximum) > 0
    mask = np.repeat(np.repeat(kept_cells, c, axis=0), c, axis=1)[:h, :w]
    return np.where(mask, ink, 0.0), [int(keep.sum()), len(masses)]


def label_cells(on: np.ndarray, weights: np.ndarray):
    """8-connected components of `on`, numbered 1.. in row-major order of their first cell:
    (labels, [(y0, y1, x0, x1) per component], [sum of weights per component])."""
    gh, gw = on.shape
    labels = np.zeros((gh, gw), dtype=np.int64)
    flat_on = on.ravel().tolist()
    flat_labels = [0] * (gh * gw)
    boxes, masses = [], []
    for start in range(gh * gw):
        if not flat_on[start] or flat_labels[start]:
            continue
        number = len(boxes) + 1
        flat_labels[start] = number
        stack, cells = [start], []
        while stack:
            cell = stack.pop()
            cells.append(cell)
            y, x = divmod(cell, gw)
            for ny in (y - 1, y, y + 1):
                if 0 <= ny < gh:
                    for nx in (x - 1, x, x + 1):
                        if 0 <= nx < gw:
                            other = ny * gw + nx
                            if flat_on[other] and not flat_labels[other]:
                                flat_labels[other] = number
                                stack.append(other)
        ys, xs = np.divmod(np.array(cells), gw)
        boxes.append((int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())))
        masses.append(float(weights.ravel()[np.sort(np.array(cells))].sum()))
    labels[:] = np.array(flat_labels).reshape(gh, gw)
    return labels, boxes, masses


def stroke_width(crop: np.ndarray) -> float:
    """Stroke width in pixels of `crop`: 2 area / perimeter of the ink above half its peak (a
    stroke of width w and length l has area w l and perimeter about 2 l)."""
    core = crop > 127.5
    area = int(core.sum())
    if area == 0:
        return 0.0
    padded = np.pad(core, 1)
    perimeter = int((padded[1:] != padded[:-1]).sum() + (padded[:, 1:] != padded[:, :-1]).sum())
    return 2.0 * area / perimeter


def measure_stroke_width(images: np.ndarray, box: int = 20) -> float:
    """The median stroke width of data-set images (N x 28 x 28, light on black) in pixels of a
    `box` box: what recipe["stroke_width"] should be for that data set."""
    widths = []
    for image in np.asarray(images, dtype=np.float64):
        if image.max() <= 0:
            continue
        r0, r1, c0, c1 = bounding_box(image / image.max() * 255.0, 25.5)
        crop = image[r0:r1 + 1, c0:c1 + 1] / image.max() * 255.0
        widths.append(stroke_width(crop) * box / max(crop.shape))
    return float(np.median(widths))


def normalize_stroke_width(crop: np.ndarray, recipe: dict) -> tuple[np.ndarray, float]:
    """Step 5a. A fine pen's strokes vanish in the 20-pixel box, a marker's fill it. The width w
    (stroke_width, in box pixels: times box / the crop's long side) outside target / tolerance ..
    target * tolerance is brought to the target: a square maximum (thin) or minimum (thick) of
    radius r = floor(|target - w| / 2 / scale + 0.5) in the crop's pixels (each side of a stroke
    moves by r), the crop padded by r with zeros, then cropped again to its bounding box above
    recipe["object_threshold"]. A crop under twice the box on its long side (the data set's own
    images among them) is left as it is: its outline is too jagged to measure. Returns the crop
    and w."""
    scale = int(recipe["box"]) / max(crop.shape)
    width = stroke_width(crop) * scale
    target, tolerance = float(recipe["stroke_width"]), float(recipe["stroke_tolerance"])
    if max(crop.shape) < 2 * int(recipe["box"]):  # too few pixels to measure a stroke by its outline
        return crop, width
    if width <= 0 or target / tolerance <= width <= target * tolerance:
        return crop, width
    radius = math.floor(abs(target - width) / 2 / scale + 0.5)
    if radius < 1:
        return crop, width
    padded = np.pad(crop, radius)
    changed = square_filter(padded, radius, np.maximum if width < target else np.minimum)
    if float(changed.max()) <= float(recipe["object_threshold"]) * 255.0:
        return crop, width  # eroded away: keep the strokes as they were
    r0, r1, c0, c1 = bounding_box(changed, float(recipe["object_threshold"]) * 255.0)
    return changed[r0:r1 + 1, c0:c1 + 1], width
