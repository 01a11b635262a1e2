"""Turn a checkpoint into what the runtimes load, and check each against the eager model.

    python -m export [build]   checkpoints/best.pt -> build/model.pt (TorchScript),
                               build/model.onnx (one file, dynamic batch), build/bundle.json;
                               --format pt2 adds build/model.pt2 (torch.export + AOTInductor)
    python -m export archive   build/ -> model_store/mnist.mar (torch-model-archiver) serving
                               --format torchscript (default), pt2 or onnx; signed with the
                               private key of `make keys` when there is one
    python -m export quantize  build/model.onnx -> build/model.int8.onnx (static QDQ int8)
    python -m export ort       build/model.onnx -> build/model.ort (minimal/mobile onnxruntime)
    python -m export verify model_store/mnist.mar
                               checks an archive before it is served, unpacked as TorchServe
                               unpacks it: structure, signature, SHA-256 sums, then the model's
                               answer to the test image bundle.json records (export/verify.py)
    python -m export keys      a signing key pair outside the repository (export/signing.py)

Before anything is written, each exported model runs the same real test images as the eager
model (through the one preprocessing function): max |dp| <= 1e-5 and identical argmax, or the
export fails with the numbers.

Every file is written whole or not at all (a temporary file in the same folder, then a rename),
and bundle.json never vouches for a file that is not there: a kill at any step leaves build/
either as it was, or without bundle.json (an export in progress, which `archive` refuses), or
new and complete.
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
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contract import MODEL_NAME, TOLERANCE
from contract.bundle import (BUNDLE_FILE, FORMAT_VERSION, BundleError, load_bundle, sha256_file,
                             verify_recorded_files, write_atomically, write_bundle)
from contract.framing import recipe_for
from contract.paths import ROOT
from contract.preprocessing import InputSpec, decode_image
from export import convert, release, signing
from export.convert import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, ExportMismatch
from export.verify import unpack, verify_archive
import formats
from train.checkpoint import CheckpointError, load_checkpoint, load_model, reconcile_best
from train.data import DataUnavailable, ensure_dataset, load_split

# What the handler imports besides TorchServe, torch and their dependencies: packed into the .mar.
HANDLER_PACKAGES = ("contract", "formats")
ONNX_FILE = formats.get("onnx").file  # packed into every archive, whatever format it serves


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
        write_atomically(directory / f"test{index:04d}-{slug}.png", png)


def checkpoint_figures(state: dict) -> dict:
    """The checkpoint's accuracies, each named by the split it was measured on."""
    metrics = state["metrics"]
    return {"chosen_on": "validation accuracy", "validation_accuracy": metrics["validation_accuracy"],
            "test_accuracy": metrics["test_accuracy"], "splits": state["data"]["splits"],
            # what the training images went through (train/loop.augmentation_record)
            "recipe": state["settings"]["recipe"], "augmentation": state["data"]["augmentation"]}


def remove_stale_temporaries(directory: Path) -> None:
    """What a killed export, quantize or archive left behind: its temporary files and folders."""
    if not directory.is_dir():
        return
    for path in directory.glob(".*"):
        if path.is_dir() and path.name.startswith((".export-", ".archive-", ".quantize-", ".ort-")):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def build(args) -> None:
    try:
        if args.checkpoint.name == "best.pt" and args.checkpoint.with_name("last.pt").exists():
            reconcile_best(args.checkpoint.parent)  # a training run stopped between its two writes
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
        convert.check_batch_size_fits(args.model_config)
    remove_stale_temporaries(out)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        records = {fmt: convert.build_format(fmt, model, x, reference, Path(tmp), args.device)
                   for fmt in built}
        for record in records.values():
            with open(Path(tmp) / record["file"], "rb") as f:
                os.fsync(f.fileno())
        # Only models that passed their check replace the previous export. The old bundle.json
        # goes first: until the new one is written, build/ holds no contract at all rather than
        # one that vouches for the previous models (int8 and ORT files made from them included).
        (out / BUNDLE_FILE).unlink(missing_ok=True)
        fsync_directory(out)
        for record in records.values():
            os.replace(Path(tmp) / record["file"], out / record["file"])

    bundle.update({
        "checkpoint": {"path": str(args.checkpoint), "sha256": sha256_file(args.checkpoint),
                       "epoch": state["epoch"], **checkpoint_figures(state),
                       "trained_on": state["trained_on"]},
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


def fsync_directory(directory: Path) -> None:
    """Make a rename or an unlink in `directory` durable before the next step depends on it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def archiver_command() -> str:
    """torch-model-archiver beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("torch-model-archiver")
    found = str(beside) if beside.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise SystemExit("[export] torch-model-archiver not found: run `make install`")
    return found


def checked_build(build_dir: Path, fmt: str) -> dict:
    """The bundle.json record of format `fmt` in build/, after checking every file bundle.json
    records; SystemExit says what to redo."""
    if not (build_dir / BUNDLE_FILE).exists():
        raise SystemExit(f"[export] {build_dir} holds no export (no {BUNDLE_FILE}): run `make export` first")
    try:
        bundle = load_bundle(build_dir / BUNDLE_FILE)
        verify_recorded_files(bundle, build_dir)
    except BundleError as error:
        raise SystemExit(f"[export] refusing to archive {build_dir}: {error}. An export was "
                         "interrupted or a file was changed by hand: run `make export` again") from None
    record = bundle["formats"].get(fmt)
    if record is None or record["file"] not in bundle["files"]:
        raise SystemExit(f"[export] {build_dir} holds no {fmt} model: run `make export FORMAT={fmt}` "
                         f"(python -m export build --format {fmt}) first")
    return record


def sign_archive(mar: Path, work: Path) -> bool:
    """Add MAR-INF/model.sig to `mar` when a private key exists; False (and a loud warning) if not."""
    key = signing.private_key_path()
    if not key.is_file():
        print("[export] " + "!" * 78 + f"\n[export] WARNING: {mar.name} is NOT SIGNED: no private key at "
              f"{key}.\n[export] Run `make keys` once, then `make archive`; hosts that pin a public key "
              "refuse unsigned archives.\n[export] " + "!" * 78)
        return False
    signing.check_private_key(key)
    tree = work / "signed"
    unpack(mar, tree)  # sign exactly what TorchServe will unpack
    signing.sign_tree(tree, work / "model.sig", key)
    with zipfile.ZipFile(mar, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(work / "model.sig", signing.SIGNATURE_NAME)
    public = signing.public_key_of(key, work / "signer.pub")
    verify_archive(mar, public_key=public, run_self_test=False, check_key_file=False)
    print(f"[export] signed with {key} (public key SHA-256 {signing.key_fingerprint(public)[:16]}...)")
    return True


def archive(args) -> Path:
    """build/ -> <model-store>/mnist.mar with torch-model-archiver, serving args.format's file,
    signed when a key exists."""
    build_dir = args.build_dir
    if args.model_version is not None and args.model_version < 1:
        raise SystemExit(f"[export] --model-version {args.model_version}: a model version is a positive integer")
    record = checked_build(build_dir, args.format)
    remove_stale_temporaries(build_dir)
    args.model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=build_dir) as tmp:
        # torch-model-archiver copies the *contents* of an extra-files directory into the
        # archive's root, so this stage holds the packages the handler imports (the contract,
        # the formats' runtime half) beside bundle.json: they resolve inside the unpacked archive.
        stage = Path(tmp) / "extra"
        for package in HANDLER_PACKAGES:
            shutil.copytree(ROOT / package, stage / package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(build_dir / BUNDLE_FILE, stage / BUNDLE_FILE)
        # The release (model version, build time) beside bundle.json: signed with the rest.
        target = args.model_store / f"{MODEL_NAME}.mar"
        built_at = datetime.datetime.now(datetime.timezone.utc)
        current = release.version_in_store(target)
        version = args.model_version or release.next_version(built_at, current)
        if current is not None and version <= current:
            print(f"[export] WARNING: model version {version} is not above {current}, the version of "
                  f"{target}: hosts that served {current} refuse it as a rollback (serve --allow-rollback)")
        released = release.make_release(MODEL_NAME, version, built_at)
        write_atomically(stage / release.RELEASE_FILE, (json.dumps(released, indent=2) + "\n").encode())
        served = record["file"]
        # model.onnx travels in every archive: the Open Inference Protocol server (oip/) runs it
        # with onnxruntime from the same signed file, whatever format TorchServe serves.
        if served != ONNX_FILE:
            shutil.copy2(build_dir / ONNX_FILE, stage / ONNX_FILE)
        shutil.copy2(build_dir / served, Path(tmp) / served)
        # What is packed is checked once more after copying: a file changed meanwhile is refused.
        bundle = load_bundle(stage / BUNDLE_FILE)
        for name, path in ((served, Path(tmp) / served), (ONNX_FILE, stage / ONNX_FILE)):
            if path.exists() and sha256_file(path) != bundle["files"][name]["sha256"]:
                raise SystemExit(f"[export] {build_dir / name} changed while archiving: run `make export`")
        command = [archiver_command(),
                   "--model-name", MODEL_NAME, "--version", str(version),
                   "--serialized-file", str(Path(tmp) / record["file"]),
                   "--handler", str(ROOT / "handlers" / "mnist_handler.py"),
                   "--extra-files", str(stage),
                   "--config-file", str(args.model_config),
                   "--export-path", tmp, "--force"]
        subprocess.run(command, check=True)
        built = Path(tmp) / f"{MODEL_NAME}.mar"
        sign_archive(built, Path(tmp))
        with open(built, "rb") as source:  # a server never sees half a file
            write_atomically(target, lambda f: shutil.copyfileobj(source, f))
    print(f"[export] wrote {target} ({args.format}, model version {version}, built {released['built_at']}, "
          f"{target.stat().st_size / 1024:.0f} KiB)\n[export] SHA-256 {sha256_file(target)}: pin it where "
          "it is served (serve start --expect-sha256, EXPECTED_SHA256 in deploy/k8s/deployment.yaml)")
    return target


COMMANDS = ("build", "archive", "quantize", "ort", "verify", "keys")


def parse_args(argv=None) -> argparse.Namespace:
    """One subcommand, with only its own options; no subcommand means build (`python -m export`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "build")
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, *options: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for option in options:
            OPTIONS[option](sub)
        return sub

    command("build", "checkpoint -> build/model.pt, model.onnx (FORMAT=pt2: model.pt2), bundle.json",
            "checkpoint", "build-dir", "data-dir", "check-images", "format", "device", "model-config",
            "threads")
    command("archive", "build/ -> model_store/mnist.mar serving one format, signed when a key exists",
            "build-dir", "model-store", "model-version", "format", "model-config")
    command("quantize", "build/model.onnx -> build/model.int8.onnx (static QDQ int8)",
            "build-dir", "data-dir", "threads")
    command("ort", "build/model.onnx -> build/model.ort (minimal/mobile onnxruntime)", "build-dir")
    verify = command("verify", "check an archive as TorchServe unpacks it, then its self-test",
                     "public-key", "allow-unsigned", "threads")
    verify.add_argument("archive", nargs="?", type=Path, default=Path("model_store/mnist.mar"),
                        help="the .mar to verify (default: model_store/mnist.mar)")
    command("keys", "make a signing key pair outside the repository")
    return p.parse_args(argv)


# Every option once, with its default and help; each subcommand takes the ones it uses.
OPTIONS = {
    "checkpoint": lambda p: p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/best.pt")),
    "build-dir": lambda p: p.add_argument("--build-dir", type=Path, default=Path("build")),
    "data-dir": lambda p: p.add_argument("--data-dir", type=Path, default=Path("data")),
    "check-images": lambda p: p.add_argument("--check-images", type=int, default=256,
                                             help="real test images each export is checked on"),
    "model-store": lambda p: p.add_argument("--model-store", type=Path, default=Path("model_store")),
    "model-version": lambda p: p.add_argument(
        "--model-version", type=int, default=None,
        help="the release's model version, a positive integer that only grows (default: the build "
             "time as YYYYMMDDHHMMSS in UTC, above the model store's archive)"),
    "model-config": lambda p: p.add_argument(
        "--model-config", type=Path, default=ROOT / "handlers" / "model-config.yaml",
        help="TorchServe model-config.yaml (workers, batching, handler settings) to pack"),
    "public-key": lambda p: p.add_argument(
        "--public-key", type=Path, default=None,
        help="the signer's public key (default: $MNIST_SIGNING_PUBLIC_KEY, else "
             "~/.config/mnist-bundle/signing-key.pub)"),
    "allow-unsigned": lambda p: p.add_argument(
        "--allow-unsigned", action="store_true",
        help="accept an archive although no public key is configured (says so loudly)"),
    "threads": lambda p: p.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads"),
    "format": lambda p: p.add_argument(
        "--format", choices=tuple(formats.FORMATS), default=formats.DEFAULT_FORMAT,
        help="also build this format (pt2 compiles, about 30 s)" if p.prog.endswith("build")
        else "the format the archive serves"),
    "device": lambda p: p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="pt2 only: the device to compile for, where it will be served "
             "(default: cuda when PyTorch sees a GPU, else cpu)"),
}


def make_keys() -> None:
    try:
        private, public = signing.create_key_pair()
    except signing.KeyPermissionError as error:
        raise SystemExit(f"[export] refusing: {error}") from None
    except signing.SignatureError as error:  # a pair exists already: kept (make demo runs keys each time)
        print(f"[export] {error}")
        return
    print(f"[export] new signing key pair: {private} (private, mode 0600: never copy it into the "
          f"repository or an archive) and {public}\n[export] public key SHA-256 "
          f"{signing.key_fingerprint(public)}\n[export] deploy: copy only {public.name} to the serving "
          f"host, as {signing.KEY_DIR / 'signing-key.pub'} or named by ${signing.PUBLIC_KEY_ENV}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if "threads" in args:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "verify":
            verify_archive(args.archive, args.public_key, args.allow_unsigned)
        elif args.command == "keys":
            make_keys()
        elif args.command in ("quantize", "ort"):
            from export.edge_artifacts import convert_to_ort, quantize
            if not (args.build_dir / "model.onnx").exists():
                raise SystemExit(f"[export] {args.build_dir / 'model.onnx'} is missing: run `make export` first")
            remove_stale_temporaries(args.build_dir)
            quantize(args.build_dir, args.data_dir) if args.command == "quantize" else convert_to_ort(args.build_dir)
        else:
            archive(args) if args.command == "archive" else build(args)
    except ExportMismatch as error:
        raise SystemExit(f"[export] {error}; nothing was replaced in {args.build_dir}/")
    except BundleError as error:
        raise SystemExit(f"[export] refusing: {error}")
