"""A stand-in for MNIST where the real one cannot be had: digits drawn from the fonts on this
machine, framed the way MNIST was made (the bounding box scaled into 20 x 20 keeping its aspect,
centred by centre of mass in 28 x 28, light on black), written as MNIST's four IDX files.

It is NOT MNIST: printed glyphs with random rotation, shear, scale and stroke weight, not
handwriting. It exists so that the digit forms of bench/forms.py (ruled and squared paper, fine
pens, ...) can be measured through the MNIST recipe with a model trained on digits; figures
from it are labelled as stand-in figures.

    python -m bench.standin_digits --out /tmp/standin --train 12000 --test 2000
    python -m train --dataset mnist --data-dir /tmp/standin ...
"""
from __future__ import annotations

import argparse
import glob
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from contract.framing import recipe_for, frame

FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/*.ttf", "/usr/share/fonts/truetype/liberation*/*.ttf",
              "/usr/share/fonts/truetype/freefont/*.ttf", "/usr/share/fonts/truetype/noto/*.ttf")


def fonts() -> list[str]:
    found = sorted({path for pattern in FONT_GLOBS for path in glob.glob(pattern)})
    found = [p for p in found if "ExtraLight" not in p]  # hairlines: too thin to be a pen
    if not found:
        raise SystemExit("no TrueType fonts found under /usr/share/fonts/truetype (apt-get install fonts-dejavu-core)")
    return found


def glyph(digit: int, font_path: str, rng) -> np.ndarray:
    """One digit, light on black, in a 96 x 96 array, rotated/sheared/thickened at random."""
    font = ImageFont.truetype(font_path, 64)
    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((48, 48), str(digit), fill=255, font=font, anchor="mm")
    shear = rng.uniform(-0.3, 0.3)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * 48, 0, 1, 0),
                              Image.Resampling.BILINEAR)
    canvas = canvas.rotate(rng.uniform(-12, 12), Image.Resampling.BILINEAR)
    weight = int(rng.integers(0, 4))  # 0: as drawn; 1-3: a broader pen
    if weight:
        canvas = canvas.filter(ImageFilter.MaxFilter(2 * weight + 1))
    return np.asarray(canvas, dtype=np.float64)


def mnist_framed(big: np.ndarray) -> np.ndarray:
    """MNIST's framing of a light-on-black glyph: box 20, centre of mass (the steps of
    contract/framing.py with the original recipe, none of the page cleaning)."""
    recipe = {k: v for k, v in recipe_for("mnist").items()
              if k in ("name", "box", "center", "sharpen", "canvas", "min_contrast", "object_threshold",
                       "polarity_threshold", "max_side")}
    framed, _ = frame(big, None, recipe, "on")
    return np.clip(np.round(framed), 0, 255).astype(np.uint8)


def make(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    paths = fonts()
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = np.stack([mnist_framed(glyph(int(d), paths[int(rng.integers(len(paths)))], rng)) for d in labels])
    return images, labels


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.standin_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="data root: writes <out>/MNIST/raw/*")
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    raw = args.out / "MNIST" / "raw"
    write_idx(raw, "train", *make(args.train, args.seed))
    write_idx(raw, "t10k", *make(args.test, args.seed + 1))
    print(f"wrote stand-in digits (fonts, not MNIST) into {raw}: {args.train} train, {args.test} test")


if __name__ == "__main__":
    main()
