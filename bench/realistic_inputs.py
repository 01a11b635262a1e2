"""Realistic inputs made from the test set: the same images, sent the way people send them.

    dataset  28 x 28 grey PNG, light object on black (the data set's own form)
    paper    dark ink on light paper, off-centre, in a 320 x 240 / 400 x 300 / 640 x 480 RGB JPEG,
             with a lighting gradient, a little blur and sensor noise
    canvas   black strokes on a transparent 280 x 280 or 200 x 200 PNG (what an HTML canvas
             exports), the object thickened as a brush would draw it
    phone    a paper photo stored sideways: the pixels rotated, EXIF Orientation 6

Each image is a function of (seed, index) alone, so a table is reproducible. `accuracy_by_form`
is the report hook for `make bench` and the tests: onnxruntime through the one preprocessing
function, accuracy per form.

    python -m bench.realistic_inputs --build build --count 1000      # prints the table
    python -m bench.realistic_inputs --figure docs/framing.png       # before/after picture
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FORMS = ("dataset", "paper", "canvas", "phone")
PAPER_SIZES = ((320, 240), (400, 300), (640, 480))  # (width, height)
CANVAS_SIZES = (280, 200)
EXIF_ORIENTATION = 0x0112
DESCRIPTIONS = {
    "dataset": "28 x 28 grey PNG, light on black (the data set's form)",
    "paper": "paper photo: dark on light, off-centre, 320 x 240 to 640 x 480 JPEG",
    "canvas": "canvas: black strokes on a transparent 200 x 200 or 280 x 280 PNG",
    "phone": "phone photo: stored sideways, EXIF Orientation 6, JPEG",
}


def make_input(image: np.ndarray, form: str, seed: int, index: int) -> bytes:
    """A 28 x 28 uint8 test image (light on black) -> the bytes of that image sent as `form`."""
    rng = np.random.default_rng([seed, index, FORMS.index(form)])
    if form == "dataset":
        return _encode(Image.fromarray(image), "PNG")
    if form == "paper":
        return _encode(paper_photo(image, rng), "JPEG", quality=int(rng.integers(70, 92)))
    if form == "canvas":
        return _encode(canvas_drawing(image, rng), "PNG")
    if form == "phone":
        return phone_jpeg(paper_photo(image, rng, sizes=((640, 480), (400, 300))), rng)
    raise ValueError(f"unknown form {form!r}; choose from {FORMS}")


def paper_photo(image: np.ndarray, rng, sizes=PAPER_SIZES) -> Image.Image:
    """Dark ink on light paper, object small and off-centre, gradient lighting, blur, noise."""
    width, height = sizes[int(rng.integers(len(sizes)))]
    side = int(min(width, height) * rng.uniform(0.3, 0.75))  # the object's 28 px become `side`
    ink = _enlarge(image, side)
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    coverage = np.zeros((height, width))
    coverage[top:top + side, left:left + side] = ink
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    paper = rng.uniform(185, 235) + rng.uniform(-30, 30) * (xs - 0.5) + rng.uniform(-30, 30) * (ys - 0.5)
    ink_level = rng.uniform(15, 60)
    tint = np.array([1.0, rng.uniform(0.97, 1.0), rng.uniform(0.9, 0.98)])  # warm paper, daylight
    gray = paper * (1 - coverage) + ink_level * coverage
    rgb = gray[..., None] * tint + rng.normal(0, 3.0, (height, width, 3))
    photo = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")
    return photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def canvas_drawing(image: np.ndarray, rng) -> Image.Image:
    """Black strokes on transparent pixels; the object's intensity becomes the strokes' alpha."""
    size = CANVAS_SIZES[int(rng.integers(len(CANVAS_SIZES)))]
    side = int(size * rng.uniform(0.55, 0.9))
    strokes = Image.fromarray((_enlarge(image, side) * 255).round().astype(np.uint8))
    strokes = strokes.filter(ImageFilter.MaxFilter(3))  # a brush is wider than one pixel
    alpha = Image.new("L", (size, size), 0)
    alpha.paste(strokes, (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))))
    drawing = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    drawing.putalpha(alpha)
    return drawing


def phone_jpeg(upright: Image.Image, rng) -> bytes:
    """Stored as the sensor saw it (turned 90 degrees) with EXIF Orientation 6 to turn it back."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display = stored pixels rotated 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    return _encode(stored, "JPEG", quality=int(rng.integers(75, 92)), exif=exif)


def _enlarge(image: np.ndarray, side: int) -> np.ndarray:
    """28 x 28 uint8 -> side x side coverage in 0..1 (bicubic, as a printer or screen would)."""
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float64) / 255.0


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def accuracy_by_form(build_dir: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0,
                     framing: str = "auto", forms=FORMS) -> dict:
    """{form: accuracy} of the ONNX model in build_dir, each image sent as each form (onnxruntime,
    one thread, through the one preprocessing function with `framing`)."""
    from contract.bundle import load_bundle
    from contract.onnx_session import open_session, run_log_probs
    from contract.preprocessing import InputSpec, preprocess

    bundle = load_bundle(Path(build_dir))
    spec = InputSpec.from_bundle(bundle)
    session = open_session(str(Path(build_dir) / "model.onnx"), "cpu", 1)
    table = {}
    for form in forms:
        x = np.concatenate([preprocess(make_input(img, form, seed, i), spec, framing)
                            for i, img in enumerate(images)])
        predicted = run_log_probs(session, x).argmax(1)
        table[form] = float((predicted == np.asarray(labels)).mean())
    return table


def framing_report(build_dir: Path, data_dir: Path, count: int = 1000, seed: int = 0) -> dict:
    """The hook for `make bench`: accuracy of each form with framing off and auto, for the data set
    the model in build_dir was trained on (its test set must be under data_dir)."""
    from contract.bundle import load_bundle

    dataset = load_bundle(Path(build_dir))["dataset"]
    images, labels = test_set(Path(data_dir), dataset, count)
    off = accuracy_by_form(build_dir, images, labels, seed, "off")
    auto = accuracy_by_form(build_dir, images, labels, seed, "auto")
    return {"dataset": dataset, "images": len(images), "seed": seed, "runtime": "onnxruntime CPU, 1 thread",
            "forms": {form: {"framing_off": off[form], "framing_auto": auto[form],
                             "points_below_dataset_form": 100 * (auto["dataset"] - auto[form])}
                      for form in FORMS}}


def markdown_table(report: dict) -> str:
    lines = [f"{report['dataset']}, first {report['images']} test images, seed {report['seed']}, "
             f"{report['runtime']}", "",
             "| the same test images, sent as | framing off | framing auto (default) |", "| --- | --- | --- |"]
    for form, row in report["forms"].items():
        lines.append(f"| {DESCRIPTIONS[form]} | {100 * row['framing_off']:.1f}% | {100 * row['framing_auto']:.1f}% |")
    return "\n".join(lines)


def test_set(data_dir: Path, dataset: str, count: int):
    """The first `count` test images (uint8, N x 28 x 28) and labels of `dataset`."""
    from train.data import ensure_dataset, load_split

    split = load_split(ensure_dataset(dataset, data_dir, allow_download=False), data_dir, train=False)
    return split.images[:count].numpy(), split.labels[:count].numpy()


def framed_view(data: bytes, spec) -> np.ndarray:
    """What the model sees for these bytes, back in 0..255 (normalization undone)."""
    from contract.preprocessing import preprocess

    x = preprocess(data, spec)[0, 0]
    return np.clip((x * spec.std[0] + spec.mean[0]) * 255.0, 0, 255)


def sent_view(data: bytes) -> Image.Image:
    """The file as a viewer shows it (stored pixels; transparency over a light grey checkerboard)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGBA":
        return image.convert("RGB")
    checks = ((np.indices(image.size[::-1]) // 10).sum(0) % 2) * 30 + 200
    board = Image.fromarray(np.repeat(checks[..., None], 3, 2).astype(np.uint8)).convert("RGBA")
    return Image.alpha_composite(board, image).convert("RGB")


def write_figure(path: Path, bundle: dict, images: np.ndarray, seed: int = 0, indices=(0, 1, 2, 3)) -> None:
    """Rows: test images; per form, the file as sent and what the model sees after framing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from contract.preprocessing import InputSpec

    spec = InputSpec.from_bundle(bundle)
    forms = ("paper", "canvas", "phone")
    fig, axes = plt.subplots(len(indices), 1 + 2 * len(forms), figsize=(2 * (1 + 2 * len(forms)), 2.1 * len(indices)))
    for row, index in enumerate(indices):
        cells = [("data set (28x28)", images[index])]
        for form in forms:
            data = make_input(images[index], form, seed, index)
            sent = sent_view(data)
            cells += [(f"{form} as sent {sent.width}x{sent.height}", sent), (f"{form} framed", framed_view(data, spec))]
        for col, (title, picture) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title.replace(" as sent", "\nas sent").replace(" framed", "\nframed"), fontsize=9)
    fig.suptitle(f"{bundle['dataset']} test images sent as people send them, and what the model sees "
                 "after framing (bundle.json's recipe)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.realistic_inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", type=Path, help="write a before/after picture here instead")
    p.add_argument("--write", type=Path, help="also write each form's files into this directory")
    args = p.parse_args(argv)
    from contract.bundle import load_bundle

    bundle = load_bundle(args.build)
    images, labels = test_set(args.data_dir, bundle["dataset"], args.count)
    if args.figure:
        write_figure(args.figure, bundle, images, args.seed)
        print(f"wrote {args.figure}")
        return
    if args.write:
        for form in FORMS:
            for i, img in enumerate(images):
                ext = {"paper": "jpg", "phone": "jpg"}.get(form, "png")
                path = args.write / form / f"{i:04d}-{int(labels[i])}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(make_input(img, form, args.seed, i))
    print(markdown_table(framing_report(args.build, args.data_dir, args.count, args.seed)))


if __name__ == "__main__":
    main()
