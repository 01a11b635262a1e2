"""Classify images with onnxruntime alone: `python -m edge IMAGE_OR_DIR... [--model build/model.onnx]`.

Reads mean, std, input size and class names from the bundle.json beside the model, preprocesses
with the same function as the TorchServe handler, batches the images of a directory, and prints
one line per image as each batch is done (with --json, one JSON object per line: {"path": ...,
and the handler's response}). A file that cannot be used (missing, unreadable, not a regular
file, over the 1 MiB limit, not an image) is reported on its line and the rest are still
classified; the exit status is then 1. Control characters in file names are printed escaped,
so that a name cannot forge output lines.

--explain DIR writes DIR/<image name>.png per classified image: the image with an Integrated
Gradients map of its predicted class on top (edge/explain.py: computed here, with onnxruntime).
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle
from contract.onnx_session import (ModelMismatch, ProviderUnavailable, check_model_matches_bundle,
                                   open_session)
from contract.framing import MODES
from contract.preprocessing import MAX_BODY_BYTES, InputSpec, InvalidInput, preprocess_framed


def image_paths(arguments: list[str]):
    """Each argument, or the files under it if it is a directory, in a stable order."""
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def read_image_file(path: Path) -> bytes:
    """The file's bytes, its size checked before it is read; InvalidInput or OSError otherwise."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput("not a regular file (a directory, device or pipe); pass image files")
    if info.st_size > MAX_BODY_BYTES:
        raise InvalidInput(f"file of {info.st_size} bytes exceeds the {MAX_BODY_BYTES}-byte limit; "
                           "downscale the image first", 413)
    with path.open("rb") as f:
        data = f.read(MAX_BODY_BYTES + 1)  # the file may have grown since stat()
    if len(data) > MAX_BODY_BYTES:
        raise InvalidInput(f"file exceeds the {MAX_BODY_BYTES}-byte limit", 413)
    return data


def shown(path: Path) -> str:
    """The path as text that fits on one line: bytes that are not UTF-8 as \\xNN, control
    characters as \\n, \\x1b and so on."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def parse_arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--model", type=Path, default=Path("build/model.onnx"),
                   help="an .onnx or .ort model (model.int8.onnx and model.ort work too)")
    p.add_argument("--bundle", type=Path, default=None, help="default: bundle.json beside the model")
    p.add_argument("--json", action="store_true", help="print one JSON object per image and line")
    p.add_argument("--timing", action="store_true", help="report the time per image")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (onnxruntime-gpu)")
    p.add_argument("--framing", choices=MODES, default="auto",
                   help="frame photos and drawings the way the data set was made (bundle.json's "
                        "recipe): auto (unless already in the data set's form), on, off")
    p.add_argument("--explain", type=Path, metavar="DIR",
                   help="write an attribution overlay PNG per image into DIR (seconds per image)")
    p.add_argument("--explain-steps", type=positive_int, default=32,
                   help="Integrated Gradients' integration points (each costs 2 x pixels model runs)")
    return p.parse_args(argv)


def print_answer(path: Path, answer: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"path": str(path), **answer}, allow_nan=False), flush=True)
    elif "error" in answer:
        print(f"{shown(path)}: error: {answer['error']}", flush=True)
    else:
        framed = " framed" if answer.get("framing", {}).get("applied") else ""
        print(f"{shown(path)}: {answer['class']} (label {answer['label']}, "
              f"p={answer['probabilities'][answer['label']]:.4f}){framed}", flush=True)


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if not args.model.is_file():
        raise SystemExit(f"[edge] no model at {args.model}: run `make export` (or pass --model)")
    try:
        bundle = load_bundle(args.bundle or args.model.parent / BUNDLE_FILE)
        session = open_session(str(args.model), args.device, args.threads)
        input_name = check_model_matches_bundle(session, bundle)
    except (BundleError, ModelMismatch, ProviderUnavailable) as error:
        raise SystemExit(f"[edge] {error}")
    spec, classes = InputSpec.from_bundle(bundle), bundle["classes"]
    explainer = Explainer(session, input_name, spec, args.explain, args.explain_steps) if args.explain else None
    if args.timing:  # the first run allocates and plans: keep it out of the figure
        session.run(None, {input_name: np.zeros((1, spec.channels, spec.height, spec.width), np.float32)})

    total, failed, classified, seconds = 0, 0, 0, 0.0
    batch: list[tuple[Path, tuple | dict]] = []  # (path, (input array, framing) or error answer)

    def flush_batch() -> None:
        nonlocal seconds, classified
        arrays = [item[0] for _, item in batch if isinstance(item, tuple)]
        probabilities = iter(())
        if arrays:
            started = time.perf_counter()
            probabilities = iter(np.exp(session.run(None, {input_name: np.concatenate(arrays)})[0]))
            seconds += time.perf_counter() - started
            classified += len(arrays)
        for path, item in batch:  # in the order given
            answer = item if isinstance(item, dict) else responses.prediction(next(probabilities), classes, item[1])
            if args.explain and "error" not in answer:
                explain(path, item[0], answer, explainer)
            print_answer(path, answer, args.json)
        batch.clear()

    for path in image_paths(args.images):
        total += 1
        try:
            batch.append((path, preprocess_framed(read_image_file(path), spec, args.framing)))
        except InvalidInput as error:
            batch.append((path, error.to_response()))
            failed += 1
        except OSError as error:
            batch.append((path, responses.error(f"cannot read the file: {error.strerror or error}", 400)))
            failed += 1
        if len(batch) >= args.batch_size:
            flush_batch()
    flush_batch()

    if args.timing and classified:
        print(f"[edge] {classified} images in {seconds * 1e3:.2f} ms of onnxruntime time: "
              f"{seconds * 1e6 / classified:.1f} us/image (batch {args.batch_size}, "
              f"{args.threads} thread(s), {session.get_providers()[0]})", file=sys.stderr)
    if failed:
        print(f"[edge] {failed} of {total} images could not be read", file=sys.stderr)
        sys.exit(1)


class Explainer:
    """Integrated Gradients overlays for the edge CLI (edge/explain.py), one file name per image."""

    def __init__(self, session, input_name: str, spec: InputSpec, directory: Path, steps: int):
        from edge import explain as method

        self.method, self.session, self.input_name, self.spec = method, session, input_name, spec
        self.directory, self.steps, self.written = directory, steps, set()
        directory.mkdir(parents=True, exist_ok=True)
        self.baseline = method.black_baseline(spec)


def explain(path: Path, image: np.ndarray, answer: dict, explainer: Explainer) -> None:
    """Write the overlay PNG of one classified image and record what was explained in `answer`."""
    m, session, name_in = explainer.method, explainer.session, explainer.input_name
    target = answer["label"]
    attributions = m.integrated_gradients(session, name_in, image, explainer.baseline, target, explainer.steps)
    name = path.stem
    while name in explainer.written:  # the same file name in two directories
        name += "_"
    explainer.written.add(name)
    overlay = explainer.directory / f"{name}.png"
    overlay.write_bytes(m.overlay_png(m.model_view(image, explainer.spec), attributions))
    output = float(m.class_probability(session, name_in, image, target)[0])
    baseline_output = float(m.class_probability(session, name_in, explainer.baseline, target)[0])
    answer["explanation"] = {"overlay": str(overlay), "steps": explainer.steps, "baseline": "black image",
                             "target": "probability of the predicted class", "output": output,
                             "baseline_output": baseline_output,
                             "attribution_sum": float(attributions.sum())}
    print(f"[edge] {shown(overlay)}: Integrated Gradients of P({answer['class']}) = {output:.4f}, "
          f"attributions sum to {attributions.sum():.4f} of {output - baseline_output:.4f} "
          f"from the black baseline ({explainer.steps} steps)", file=sys.stderr)
