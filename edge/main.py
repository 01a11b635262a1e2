"""Classify images with onnxruntime alone: `python -m edge IMAGE_OR_DIR... [--model build/model.onnx]`.

Reads mean, std, input size and class names from the bundle.json beside the model, preprocesses
with the same function as the TorchServe handler, batches the images of a directory, and prints
one line per image (or, with --json, the handler's response format). An image that cannot be read
is reported and the rest are still classified; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from contract import responses
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle
from contract.onnx_session import (ModelMismatch, ProviderUnavailable, check_model_matches_bundle,
                                   open_session)
from contract.framing import MODES
from contract.preprocessing import InputSpec, InvalidInput, preprocess_framed


def image_paths(arguments: list[str]) -> list[Path]:
    paths = []
    for argument in arguments:
        path = Path(argument)
        paths.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--model", type=Path, default=Path("build/model.onnx"),
                   help="an .onnx or .ort model (model.int8.onnx and model.ort work too)")
    p.add_argument("--bundle", type=Path, default=None, help="default: bundle.json beside the model")
    p.add_argument("--json", action="store_true", help="print {path: handler response} as JSON")
    p.add_argument("--timing", action="store_true", help="report the time per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (onnxruntime-gpu)")
    p.add_argument("--framing", choices=MODES, default="auto",
                   help="frame photos and drawings the way the data set was made (bundle.json's "
                        "recipe): auto (unless already in the data set's form), on, off")
    args = p.parse_args(argv)

    if not args.model.is_file():
        raise SystemExit(f"[edge] no model at {args.model}: run `make export` (or pass --model)")
    try:
        bundle = load_bundle(args.bundle or args.model.parent / BUNDLE_FILE)
        session = open_session(str(args.model), args.device, args.threads)
        input_name = check_model_matches_bundle(session, bundle)
    except (BundleError, ModelMismatch, ProviderUnavailable) as error:
        raise SystemExit(f"[edge] {error}")
    spec, classes = InputSpec.from_bundle(bundle), bundle["classes"]

    results, failed, seconds = {}, 0, 0.0
    paths = image_paths(args.images)
    if args.timing:  # the first run allocates and plans: keep it out of the figure
        session.run(None, {input_name: np.zeros((1, spec.channels, spec.height, spec.width), np.float32)})
    for start in range(0, len(paths), args.batch_size):
        arrays, batch_paths, framings = [], [], []
        for path in paths[start:start + args.batch_size]:
            try:
                array, framed = preprocess_framed(path.read_bytes(), spec, args.framing)
                arrays.append(array)
                framings.append(framed)
                batch_paths.append(path)
            except (InvalidInput, OSError) as error:
                results[str(path)] = responses.error(str(error), getattr(error, "status", 400))
                failed += 1
        if not arrays:
            continue
        started = time.perf_counter()
        log_probs = session.run(None, {input_name: np.concatenate(arrays)})[0]
        seconds += time.perf_counter() - started
        for path, row, framed in zip(batch_paths, np.exp(log_probs), framings):
            results[str(path)] = responses.prediction(row, classes, framed)

    results = {str(path): results[str(path)] for path in paths}  # in the order given
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for path, answer in results.items():
            if "error" in answer:
                print(f"{path}: error: {answer['error']}")
            else:
                framed = " framed" if answer["framing"]["applied"] else ""
                print(f"{path}: {answer['class']} (label {answer['label']}, "
                      f"p={answer['probabilities'][answer['label']]:.4f}){framed}")
    classified = len(paths) - failed
    if args.timing and classified:
        print(f"[edge] {classified} images in {seconds * 1e3:.2f} ms of onnxruntime time: "
              f"{seconds * 1e6 / classified:.1f} us/image (batch {args.batch_size}, "
              f"{args.threads} thread(s), {session.get_providers()[0]})", file=sys.stderr)
    if failed:
        print(f"[edge] {failed} of {len(paths)} images could not be read", file=sys.stderr)
        sys.exit(1)
