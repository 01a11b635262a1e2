"""The forms people send, made from test arrays with seeded randomness, and accuracy per form.

Each form is a function of (image, seed, index) alone, so a table is reproducible. The page is
drawn as reflectances that multiply (paper colour x printed lines x ink x lighting), then noise,
blur and the file format, as a camera or a screen would produce it:

    dataset   28 x 28 grey PNG, light on black (the data set's own form)
    paper     dark ink on light paper, 320 x 240 to 640 x 480 JPEG (bench/realistic_inputs.py)
    canvas    black strokes on a transparent PNG (bench/realistic_inputs.py)
    phone     a paper photo stored sideways with EXIF Orientation 6 (bench/realistic_inputs.py)
    ruled     ballpoint on ruled paper (blue lines 18-34 px apart, a red margin line)
    squared   ballpoint on squared notebook paper (a grey-blue grid 16-30 px)
    dotted    ballpoint on dot-grid paper
    shadow    ballpoint under a soft shadow across the page, and a vignette
    fine      a fine pen: strokes about a third of the data set's width
    marker    a thick marker: strokes about twice the data set's width
    darkmode  a dark-mode screenshot: light strokes on a dark grey RGB PNG
    noisy     a small digit (12-20 % of the frame) in a noisy photo
    webp      a paper photo as lossy WebP (quality 25-60)
    tinted    tinted, textured paper (yellow, blue, pink, grey recycled)
    colour    coloured ink (blue, red, green, violet) on white paper

`accuracy_per_form(predict, images, labels, forms)` takes any predictor of bytes -> label, so
`make bench`, the tests and the stand-in measurement share it; `onnx_predictor` is the real one
(contract.preprocessing + onnxruntime).

    python -m bench.forms --build build --count 500 [--recipe-from-code]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bench import realistic_inputs

DIGIT_FORMS = ("dataset", "paper", "canvas", "phone", "ruled", "squared", "dotted", "shadow", "fine",
               "marker", "darkmode", "noisy", "webp", "tinted", "colour")
# Paper structure and pen width are about handwriting; the rest applies to any light object.
OBJECT_FORMS = ("dataset", "paper", "canvas", "phone", "shadow", "darkmode", "noisy", "webp", "tinted", "colour")
FORMS_BY_DATASET = {"mnist": DIGIT_FORMS, "fashion-mnist": OBJECT_FORMS}
DESCRIPTIONS = {
    **realistic_inputs.DESCRIPTIONS,
    "ruled": "ruled paper, ballpoint, JPEG",
    "squared": "squared notebook paper, ballpoint, JPEG",
    "dotted": "dot-grid paper, ballpoint, JPEG",
    "shadow": "ballpoint under a shadow and a vignette, JPEG",
    "fine": "fine pen (a third of the data set's stroke width), JPEG",
    "marker": "thick marker (twice the stroke width), JPEG",
    "darkmode": "dark-mode screenshot, light strokes on dark grey, PNG",
    "noisy": "a small object (12-20 % of the frame) in a noisy photo, JPEG",
    "webp": "paper photo as lossy WebP (quality 25-60)",
    "tinted": "tinted, textured paper, JPEG",
    "colour": "coloured ink on white paper, JPEG",
}
PHOTO_SIZES = ((320, 240), (400, 300), (640, 480))
INKS = {"blue": (30, 50, 150), "red": (170, 30, 35), "green": (20, 110, 50), "violet": (90, 30, 130)}
TINTS = ((250, 240, 170), (200, 225, 250), (250, 210, 225), (205, 200, 190))


def make_form(image: np.ndarray, form: str, seed: int, index: int) -> bytes:
    """A 28 x 28 uint8 test image (light on black) -> the bytes of that image sent as `form`."""
    if form in realistic_inputs.FORMS:
        return realistic_inputs.make_input(image, form, seed, index)
    if form not in DIGIT_FORMS:
        raise ValueError(f"unknown form {form!r}; choose from {DIGIT_FORMS}")
    rng = np.random.default_rng([seed, index, 100 + DIGIT_FORMS.index(form)])
    if form == "darkmode":
        return _encode(dark_screenshot(image, rng), "PNG")
    if form == "webp":
        photo = page(image, rng)
        return _encode(photo, "WEBP", quality=int(rng.integers(25, 61)))
    options = {
        "ruled": dict(structure="ruled"), "squared": dict(structure="squared"), "dotted": dict(structure="dotted"),
        "shadow": dict(shadow=True), "fine": dict(pen="fine"), "marker": dict(pen="marker"),
        "noisy": dict(side_range=(0.12, 0.2), noise=(10.0, 18.0)),
        "tinted": dict(paper=TINTS[int(rng.integers(len(TINTS)))], texture=True),
        "colour": dict(ink=list(INKS.values())[int(rng.integers(len(INKS)))], paper=(245, 245, 242)),
    }[form]
    return _encode(page(image, rng, **options), "JPEG", quality=int(rng.integers(70, 92)))


def pen_coverage(image: np.ndarray, side: int, pen: str, rng) -> np.ndarray:
    """side x side ink coverage 0..1; a fine pen keeps the strokes' core, a marker widens them."""
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    if pen in ("fine", "marker"):
        from contract.framing import stroke_width
        width = stroke_width(np.asarray(big, dtype=np.float64))  # this glyph's own strokes, in pixels
    if pen == "fine":
        core = big.point(lambda v: 255 if v > 128 else 0)
        k = 2 * int(width / 3) + 1  # each side moves in by a third: a third of the width is left
        big = core.filter(ImageFilter.MinFilter(k)) if k > 1 else core
        big = big.filter(ImageFilter.GaussianBlur(0.6))
    elif pen == "marker":
        k = 2 * max(1, int(width / 2)) + 1  # each side moves out by half: twice the width
        big = big.filter(ImageFilter.MaxFilter(k))
    return np.asarray(big, dtype=np.float64) / 255.0


def page(image: np.ndarray, rng, structure: str | None = None, shadow: bool = False, pen: str = "ballpoint",
         side_range=(0.3, 0.7), noise=(2.0, 5.0), paper=None, ink=None, texture: bool = False) -> Image.Image:
    """A photographed page with the object written on it, as RGB."""
    width, height = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
    side = max(12, int(min(width, height) * rng.uniform(*side_range)))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    ink_cover = np.zeros((height, width))
    ink_cover[top:top + side, left:left + side] = pen_coverage(image, side, pen, rng)
    paper_rgb = np.array(paper if paper is not None else (rng.uniform(225, 250),) * 3, dtype=np.float64)
    ink_rgb = np.array(ink if ink is not None else (rng.uniform(15, 50), rng.uniform(15, 50), rng.uniform(40, 110)))
    reflect = np.ones((height, width, 3)) * paper_rgb / 255.0
    if texture:  # fibres and blotches: smooth noise at two scales
        for scale, amount in ((8, 0.04), (2, 0.03)):
            blotch = rng.normal(0, 1, (height // scale + 1, width // scale + 1))
            blotch = np.asarray(Image.fromarray(blotch.astype(np.float32)).resize(
                (width, height), Image.Resampling.BICUBIC), dtype=np.float64)
            reflect *= (1 + amount * blotch)[..., None]
    if structure:
        lines, colour = printed_structure(structure, height, width, rng)
        reflect *= 1 - lines[..., None] * (1 - colour / 255.0)
    reflect *= 1 - ink_cover[..., None] * (1 - ink_rgb / 255.0)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    light = 1 + rng.uniform(-0.12, 0.12) * (xs - 0.5) + rng.uniform(-0.12, 0.12) * (ys - 0.5)
    if shadow:
        light = light * shadow_field(height, width, rng)
    rgb = 255.0 * reflect * light[..., None] + rng.normal(0, rng.uniform(*noise), (height, width, 3))
    photo = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")
    return photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))


def printed_structure(kind: str, height: int, width: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(coverage 0..1 of printed lines/dots, their RGB colour)."""
    cover = np.zeros((height, width))
    if kind == "ruled":
        spacing, offset = rng.uniform(18, 34), rng.uniform(0, 20)
        thick = int(rng.integers(1, 3))
        for y in np.arange(offset, height, spacing).astype(int):
            cover[y:y + thick] = 0.9
        margin = int(rng.uniform(0.08, 0.2) * width)
        cover[:, margin:margin + thick] = np.maximum(cover[:, margin:margin + thick], 0.8)
        return cover, np.array((120.0, 150.0, 215.0))
    if kind == "squared":
        spacing = rng.uniform(16, 30)
        oy, ox = rng.uniform(0, spacing, 2)
        for y in np.arange(oy, height, spacing).astype(int):
            cover[y] = 0.85
        for x in np.arange(ox, width, spacing).astype(int):
            cover[:, x] = 0.85
        return cover, np.array((130.0, 150.0, 185.0))
    if kind == "dotted":
        spacing = rng.uniform(16, 28)
        oy, ox = rng.uniform(0, spacing, 2)
        for y in np.arange(oy, height - 1, spacing).astype(int):
            for x in np.arange(ox, width - 1, spacing).astype(int):
                cover[y:y + 2, x:x + 2] = 0.9
        return cover, np.array((120.0, 125.0, 140.0))
    raise ValueError(f"unknown paper structure {kind!r}")


def shadow_field(height: int, width: int, rng) -> np.ndarray:
    """Light falling off in a soft-edged shadow (a hand or a phone) over part of the page, times a
    vignette: a multiplier 0.45..1."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    d = (xs - width / 2) * np.cos(angle) + (ys - height / 2) * np.sin(angle) - rng.uniform(-0.3, 0.3) * min(height, width)
    soft = rng.uniform(0.03, 0.12) * min(height, width)
    depth = rng.uniform(0.25, 0.45)
    light = 1 - depth / (1 + np.exp(-d / soft))
    r = np.hypot((xs - width / 2) / (width / 2), (ys - height / 2) / (height / 2))
    return light * (1 - rng.uniform(0.1, 0.25) * r ** 2)


def dark_screenshot(image: np.ndarray, rng) -> Image.Image:
    """Light strokes on an app's dark grey background (anti-aliased, as a drawing app shows them)."""
    size = int(rng.choice([300, 360, 420]))
    side = int(size * rng.uniform(0.5, 0.85))
    cover = np.zeros((size, size))
    left, top = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    cover[top:top + side, left:left + side] = pen_coverage(image, side, "ballpoint", rng)
    background = np.array((rng.uniform(18, 45),) * 3) + np.array((0, 0, rng.uniform(0, 8)))
    stroke = np.array((rng.uniform(215, 250),) * 3)
    rgb = background * (1 - cover[..., None]) + stroke * cover[..., None]
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---- measuring ----------------------------------------------------------------------------------

def accuracy_per_form(predict, images: np.ndarray, labels: np.ndarray, forms, seed: int = 0) -> dict:
    """{form: accuracy}: `predict(list of bytes) -> labels` on every image sent as each form."""
    labels = np.asarray(labels)
    return {form: float((np.asarray(predict([make_form(img, form, seed, i) for i, img in enumerate(images)]))
                         == labels).mean()) for form in forms}


def onnx_predictor(build_dir: Path, recipe: dict | None = None, framing: str = "auto"):
    """bytes -> label through contract.preprocessing and onnxruntime (CPU, one thread), with
    bundle.json's framing recipe or `recipe` in its place (to measure a recipe not yet exported)."""
    from dataclasses import replace

    from contract.bundle import load_bundle
    from contract.onnx_session import open_session, run_log_probs
    from contract.preprocessing import InputSpec, preprocess

    spec = InputSpec.from_bundle(load_bundle(Path(build_dir)))
    if recipe is not None:
        spec = replace(spec, framing=recipe)
    session = open_session(str(Path(build_dir) / "model.onnx"), "cpu", 1)

    def predict(bodies):
        x = np.concatenate([preprocess(body, spec, framing) for body in bodies])
        return run_log_probs(session, x).argmax(1)
    return predict


def forms_report(build_dir: Path, data_dir: Path, count: int = 500, seed: int = 0, recipe: dict | None = None) -> dict:
    """The hook for `make bench`: accuracy per form (those that apply to the model's data set)."""
    from contract.bundle import load_bundle

    dataset = load_bundle(Path(build_dir))["dataset"]
    images, labels = realistic_inputs.test_set(Path(data_dir), dataset, count)
    forms = FORMS_BY_DATASET.get(dataset, OBJECT_FORMS)
    accuracy = accuracy_per_form(onnx_predictor(build_dir, recipe), images, labels, forms, seed)
    return {"dataset": dataset, "images": len(images), "seed": seed, "runtime": "onnxruntime CPU, 1 thread",
            "accuracy": accuracy}


def markdown_table(report: dict) -> str:
    lines = [f"{report['dataset']}, first {report['images']} test images, seed {report['seed']}, {report['runtime']}",
             "", "| form | accuracy |", "| --- | --- |"]
    lines += [f"| {DESCRIPTIONS[form]} | {100 * acc:.1f}% |" for form, acc in report["accuracy"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.forms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe-from-code", action="store_true",
                   help="frame with contract/framing.py's current recipe instead of bundle.json's")
    p.add_argument("--write", type=Path, help="also write the first 8 images of each form here")
    args = p.parse_args(argv)
    from contract.bundle import load_bundle
    from contract.framing import recipe_for

    dataset = load_bundle(args.build)["dataset"]
    recipe = recipe_for(dataset) if args.recipe_from_code else None
    if args.write:
        images, labels = realistic_inputs.test_set(args.data_dir, dataset, 8)
        for form in FORMS_BY_DATASET.get(dataset, OBJECT_FORMS):
            for i, img in enumerate(images):
                data = make_form(img, form, args.seed, i)
                path = args.write / form / f"{i:02d}-{int(labels[i])}.{Image.open(io.BytesIO(data)).format.lower()}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    print(markdown_table(forms_report(args.build, args.data_dir, args.count, args.seed, recipe)))


if __name__ == "__main__":
    main()
