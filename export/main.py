"""Turn a checkpoint into what the runtimes load, and check each against the eager model.

    python -m export [build]   checkpoints/best.pt -> build/model.pt (TorchScript),
                               build/model.onnx (one file, dynamic batch), build/bundle.json;
                               --format pt2 adds build/model.pt2 (torch.export + AOTInductor)
    python -m export archive   build/ -> model_store/mnist.mar (torch-model-archiver) serving
                               --format torchscript (default), pt2 or onnx
    python -m export quantize  build/model.onnx -> build/model.int8.onnx (static QDQ int8)
    python -m export ort       build/model.onnx -> build/model.ort (minimal/mobile onnxruntime)
    python -m export verify model_store/mnist.mar
                               checks an archive before it is served: manifest, SHA-256 sums,
                               and the model's answer to the test image bundle.json records

Before anything is written, each exported model runs the same real test images as the eager
model (through the one preprocessing function): max |dp| <= 1e-5 and identical argmax, or the
export fails with the numbers.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contract import MODEL_NAME, TOLERANCE
from contract.bundle import (BUNDLE_FILE, FORMAT_VERSION, BundleError, load_bundle,
                             sha256_bytes, sha256_file, served_format, write_bundle)
from contract.framing import recipe_for
from contract.onnx_session import open_session, run_log_probs
from contract.preprocessing import InputSpec, decode_image
from export import formats
from train.checkpoint import CheckpointError, load_checkpoint, load_model
from train.data import DataUnavailable, ensure_dataset, load_split

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "log_probs"  # recorded in bundle.json; runtimes ask the model
ROOT = Path(__file__).resolve().parent.parent


class ExportMismatch(RuntimeError):
    """An exported model does not reproduce the eager model's outputs."""


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_images_as_png(state: dict, data_dir: Path, count: int) -> tuple[list[bytes], list[int]]:
    """The first `count` test images of the checkpoint's data set, as PNG files would send them."""
    info = ensure_dataset(state["data"]["dataset"], data_dir, allow_download=False)
    test = load_split(info, data_dir, train=False)
    return [png_bytes(img.numpy()) for img in test.images[:count]], test.labels[:count].tolist()


def write_samples(pngs: list[bytes], labels: list[int], classes: list[str], directory: Path) -> None:
    """A few real test images to try the server with (`make predict IMG=build/samples/...`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, (png, label) in enumerate(zip(pngs, labels)):
        slug = "".join(c if c.isalnum() else "-" for c in classes[label].lower())
        (directory / f"test{index:04d}-{slug}.png").write_bytes(png)


def compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |dp| between two log-probability arrays; raises ExportMismatch beyond TOLERANCE."""
    p_ref, p_new = np.exp(reference.astype(np.float64)), np.exp(candidate.astype(np.float64))
    max_diff = float(np.abs(p_ref - p_new).max())
    argmax_differs = int((p_ref.argmax(1) != p_new.argmax(1)).sum())
    print(f"[export] {name}: max |dp| {max_diff:.3g} over {len(reference)} images, "
          f"argmax differs on {argmax_differs}")
    if max_diff > TOLERANCE or argmax_differs:
        raise ExportMismatch(f"{name} does not match the eager model: max |dp| {max_diff:.3g} "
                             f"(limit {TOLERANCE}), argmax differs on {argmax_differs} images")
    return max_diff


def export_torchscript(model, x: torch.Tensor, path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.14 but is what TorchServe loads natively.
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(x).numpy()


def export_onnx(model, x: torch.Tensor, path: Path) -> np.ndarray:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(model, (x[:2],), str(path), dynamo=True, external_data=False,
                      opset_version=ONNX_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes={"x": {0: batch}}, verbose=False)
    if path.with_name(path.name + ".data").exists():
        raise RuntimeError(f"torch.onnx.export wrote {path.name}.data beside the model")
    onnx.checker.check_model(str(path), full_check=True)
    return run_log_probs(open_session(str(path), "cpu"), x.numpy())


def checkpoint_figures(state: dict) -> dict:
    """The checkpoint's accuracies, each named by the split it was measured on."""
    metrics, splits = state["metrics"], state["data"].get("splits")
    if "validation_accuracy" not in metrics:  # trained before the validation split
        return {"chosen_on": "test accuracy", "test_accuracy": metrics["test_accuracy"]}
    return {"chosen_on": "validation accuracy", "validation_accuracy": metrics["validation_accuracy"],
            "test_accuracy": metrics["test_accuracy"], "splits": splits}


def build(args) -> None:
    try:
        state = load_checkpoint(args.checkpoint)
    except CheckpointError as error:
        raise SystemExit(f"[export] {error}")
    data = state["data"]
    bundle = {
        "format_version": FORMAT_VERSION,
        "model_name": MODEL_NAME,
        "architecture": state["architecture"],
        "dataset": data["dataset"],
        "classes": data["classes"],
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
                  "channels": data["input_shape"][0], "height": data["input_shape"][1],
                  "width": data["input_shape"][2], "mean": [data["mean"]], "std": [data["std"]],
                  "scale": "pixel / 255, then (x - mean) / std",
                  # how real-world images are framed like the data set's (contract/framing.py)
                  "framing": recipe_for(data["dataset"])},
        "output": {"name": OUTPUT_NAME, "kind": "log_softmax", "probabilities": "exp(log_probs)"},
    }
    spec = InputSpec.from_bundle(bundle)
    try:
        pngs, labels = test_images_as_png(state, args.data_dir, args.check_images)
    except DataUnavailable as error:
        raise SystemExit(f"[export] real test images are needed to check the export: {error}")
    x = torch.from_numpy(np.concatenate([decode_image(png, spec) for png in pngs]))
    model = load_model(state)
    with torch.inference_mode():
        reference = model(x).numpy()

    out = args.build_dir
    out.mkdir(parents=True, exist_ok=True)
    # TorchScript and ONNX always (the tests and the edge use them); pt2 when asked: it compiles.
    built = ["torchscript", "onnx"] + (["pt2"] if args.format == "pt2" else [])
    if "pt2" in built:
        formats.check_batch_size_fits(args.model_config)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        records = {fmt: formats.build_format(fmt, model, x, reference, Path(tmp), args.device)
                   for fmt in built}
        # Only models that passed their check replace the previous export.
        for record in records.values():
            os.replace(Path(tmp) / record["file"], out / record["file"])

    bundle.update({
        "checkpoint": {"path": str(args.checkpoint), "sha256": sha256_file(args.checkpoint),
                       "epoch": state["epoch"], **checkpoint_figures(state),
                       "trained_on": state.get("trained_on", "cpu")},
        "files": {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in records.values()},
        # What each format's file is and how close it came to the eager model; `make archive
        # FORMAT=...` packs one of them and the handler loads it as its format needs.
        "formats": records,
        "export_check": {"images": len(x), "tolerance": TOLERANCE,
                         **{f"{fmt}_max_abs_dp": r["max_abs_dp"] for fmt, r in records.items()}},
        # What `export verify` expects the archived model to answer for a real test image.
        "self_test": {"image_png_base64": base64.b64encode(pngs[0]).decode(), "label": int(reference[0].argmax()),
                      "probabilities": np.exp(reference[0].astype(np.float64)).tolist()},
        "onnx_opset": ONNX_OPSET,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    write_bundle(bundle, out / BUNDLE_FILE)
    write_samples(pngs[:5], labels[:5], data["classes"], out / "samples")
    figures = bundle["checkpoint"]
    written = ", ".join(str(out / r["file"]) for r in records.values())
    print(f"[export] wrote {written}, {out}/{BUNDLE_FILE} "
          f"({data['dataset']}, epoch {state['epoch']}, chosen on {figures['chosen_on']}; test accuracy "
          f"{100 * figures['test_accuracy']:.2f}%)")


def archiver_command() -> str:
    """torch-model-archiver beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("torch-model-archiver")
    found = str(beside) if beside.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise SystemExit("[export] torch-model-archiver not found: run `make install`")
    return found


def archive(args) -> Path:
    """build/ -> <model-store>/mnist.mar with torch-model-archiver, serving args.format's file."""
    build_dir = args.build_dir
    if not (build_dir / BUNDLE_FILE).exists():
        raise SystemExit(f"[export] {build_dir / BUNDLE_FILE} is missing: run `make export` first")
    record = load_bundle(build_dir / BUNDLE_FILE).get("formats", {}).get(args.format)
    if record is None or not (build_dir / record["file"]).exists():
        raise SystemExit(f"[export] {build_dir} holds no {args.format} model: run "
                         f"`make export FORMAT={args.format}` (python -m export build --format {args.format}) first")
    args.model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=build_dir) as tmp:
        # torch-model-archiver copies the *contents* of an extra-files directory into the
        # archive's root, so this stage holds the contract package beside bundle.json: the
        # handler's `import contract` resolves inside the unpacked archive.
        stage = Path(tmp) / "extra"
        shutil.copytree(ROOT / "contract", stage / "contract",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(build_dir / BUNDLE_FILE, stage / BUNDLE_FILE)
        command = [archiver_command(),
                   "--model-name", MODEL_NAME, "--version", args.version,
                   "--serialized-file", str(build_dir / record["file"]),
                   "--handler", str(ROOT / "handlers" / "mnist_handler.py"),
                   "--extra-files", str(stage),
                   "--config-file", str(args.model_config),
                   "--export-path", tmp, "--force"]
        subprocess.run(command, check=True)
        target = args.model_store / f"{MODEL_NAME}.mar"
        os.replace(Path(tmp) / f"{MODEL_NAME}.mar", target)  # a server never sees half a file
    print(f"[export] wrote {target} ({args.format}, {target.stat().st_size / 1024:.0f} KiB)")
    return target


def verify_archive(mar: Path) -> dict:
    """Open a .mar and check it can be trusted; raises BundleError naming what is wrong."""
    if not zipfile.is_zipfile(mar):
        raise BundleError(f"{mar} is not a model archive (not a zip file)")
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        try:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            serialized, handler = manifest["model"]["serializedFile"], manifest["model"]["handler"]
        except (KeyError, json.JSONDecodeError) as error:
            raise BundleError(f"{mar}: missing or malformed MAR-INF/MANIFEST.json ({error})") from None
        for required in (serialized, handler, BUNDLE_FILE, "contract/preprocessing.py"):
            if required not in names:
                raise BundleError(f"{mar} lacks {required}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / BUNDLE_FILE).write_bytes(archive.read(BUNDLE_FILE))
            bundle = load_bundle(Path(tmp) / BUNDLE_FILE)
        expected = bundle["files"].get(serialized, {}).get("sha256")
        model_bytes = archive.read(serialized)
        actual = sha256_bytes(model_bytes)
        if actual != expected:
            raise BundleError(f"{mar}: {serialized} has SHA-256 {actual}, bundle.json expects {expected}")
    fmt, record = served_format(bundle, serialized)
    test = bundle["self_test"]
    x = decode_image(base64.b64decode(test["image_png_base64"]), InputSpec.from_bundle(bundle))
    p = np.exp(formats.self_test_log_probs(fmt, record, model_bytes, x).astype(np.float64))[0]
    max_diff = float(np.abs(p - np.array(test["probabilities"])).max())
    if int(p.argmax()) != test["label"] or max_diff > TOLERANCE:
        raise BundleError(f"{mar}: the model answers label {int(p.argmax())} (max |dp| {max_diff:.3g}) "
                          f"where bundle.json expects label {test['label']}")
    print(f"[export] {mar}: OK: manifest, {serialized} ({fmt}) SHA-256 {actual[:12]}..., self-test label "
          f"{test['label']} ({bundle['classes'][test['label']]}), max |dp| {max_diff:.3g}")
    return bundle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=("build", "archive", "quantize", "ort", "verify"),
                   default="build")
    p.add_argument("archive", nargs="?", type=Path, default=Path("model_store/mnist.mar"),
                   help="the .mar to verify")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/best.pt"))
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--check-images", type=int, default=256,
                   help="real test images each export is checked on")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--version", default="1.0", help="model version recorded in the .mar")
    p.add_argument("--model-config", type=Path, default=ROOT / "handlers" / "model-config.yaml",
                   help="TorchServe model-config.yaml (workers, batching, handler settings) to pack")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--format", choices=tuple(formats.FILES), default=formats.DEFAULT_FORMAT,
                   help="build: also build this format (pt2 compiles, about 30 s); archive: serve it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="pt2 only: the device to compile for, where it will be served "
                        "(default: cuda when PyTorch sees a GPU, else cpu)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "verify":
            verify_archive(args.archive)
        elif args.command in ("quantize", "ort"):
            from export.edge_artifacts import convert_to_ort, quantize
            if not (args.build_dir / "model.onnx").exists():
                raise SystemExit(f"[export] {args.build_dir / 'model.onnx'} is missing: run `make export` first")
            quantize(args.build_dir, args.data_dir) if args.command == "quantize" else convert_to_ort(args.build_dir)
        else:
            archive(args) if args.command == "archive" else build(args)
    except ExportMismatch as error:
        raise SystemExit(f"[export] {error}; nothing was replaced in {args.build_dir}/")
    except BundleError as error:
        raise SystemExit(f"[export] refusing: {error}")
