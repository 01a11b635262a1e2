"""bundle.json: the contract between export and every runtime (numpy-free, torch-free).

export/ writes it once from the checkpoint; the TorchServe handler, the edge predictor and the
parity tests read it. Nothing else hard-codes normalization, input size or class names.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

BUNDLE_FILE = "bundle.json"
FORMAT_VERSION = 1
REQUIRED = {
    "format_version": int,
    "model_name": str,
    "dataset": str,
    "classes": list,
    "input": dict,
    "output": dict,
    "checkpoint": dict,
    "files": dict,
}
REQUIRED_INPUT = ("name", "channels", "height", "width", "mean", "std")


class BundleError(ValueError):
    """bundle.json is missing, malformed, or does not match the files beside it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: Path | str) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILE
    try:
        bundle = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} not found: run `make export` first") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    for key, kind in REQUIRED.items():
        if not isinstance(bundle.get(key), kind):
            raise BundleError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if bundle["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {bundle['format_version']} is not {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_INPUT if k not in bundle["input"]]
    if missing:
        raise BundleError(f"{path}: input lacks {', '.join(missing)}")
    return bundle


def verify_file(bundle: dict, directory: Path | str, name: str) -> Path:
    """Check that `name` in `directory` has the SHA-256 that bundle.json records for it."""
    entry = bundle["files"].get(name)
    if entry is None:
        raise BundleError(f"bundle.json records no file named {name!r}")
    path = Path(directory) / name
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise BundleError(f"{path} has SHA-256 {actual}, but bundle.json expects {entry['sha256']}: "
                          "the file was changed after export; rebuild it with `make archive`")
    return path
