"""bundle.json: the contract between export and every runtime (numpy-free, torch-free).

export/ writes it from the checkpoint (write_bundle, record_files: always atomically); the
TorchServe handler, the edge predictor and the parity tests read it. Nothing else hard-codes
normalization, input size or class names.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


def write_atomically(path: Path | str, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function that writes to a binary file) to `path` so that a
    reader sees the old file or the new one, never half.

    A temporary file in the same directory, flushed to disk, then renamed over `path` (a rename
    within one file system is atomic). A failure at any point leaves the previous file and no
    temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a file written the ordinary way gets 0666 less the umask,
        # and other users (a serving image's non-root user) must read an archive or a model
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_bundle(bundle: dict, path: Path | str) -> Path:
    """bundle.json, written atomically; `path` may be the file or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILE
    write_atomically(path, (json.dumps(bundle, indent=2, allow_nan=False) + "\n").encode())
    return path


def file_entry(path: Path | str) -> dict:
    """What bundle.json records of an exported file."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def verify_recorded_files(bundle: dict, directory: Path | str) -> None:
    """Every file bundle.json records, present in `directory` with its recorded SHA-256."""
    for name in bundle["files"]:
        verify_file(bundle, directory, name)


def replace_recorded_files(build_dir: Path | str, staged: dict[str, Path], section: str | None = None,
                           report: dict | None = None) -> dict:
    """Move `staged` files ({name: temporary path in build_dir}) over build_dir/<name> and record
    them in bundle.json, so that a kill at any point leaves bundle.json true.

    bundle.json first forgets the old files (atomically), then each file is renamed into place,
    then bundle.json records the new ones: at no moment does it vouch for a file that is not there.
    """
    build_dir = Path(build_dir)
    bundle = load_bundle(build_dir / BUNDLE_FILE)
    if any(name in bundle["files"] for name in staged) or (section and section in bundle.get("edge", {})):
        for name in staged:
            bundle["files"].pop(name, None)
        bundle.get("edge", {}).pop(section, None)
        write_bundle(bundle, build_dir / BUNDLE_FILE)
    for name, path in staged.items():
        os.replace(path, build_dir / name)
    return record_files(build_dir, list(staged), section, report)


def record_files(build_dir: Path | str, names: list[str], section: str | None = None,
                 report: dict | None = None) -> dict:
    """Add the SHA-256 and size of `names` (files in build_dir) to build_dir/bundle.json, and
    `report` under bundle["edge"][section]; returns the bundle as written."""
    build_dir = Path(build_dir)
    bundle = load_bundle(build_dir / BUNDLE_FILE)
    for name in names:
        bundle["files"][name] = file_entry(build_dir / name)
    if report is not None:
        bundle.setdefault("edge", {})[section] = report
    write_bundle(bundle, build_dir / BUNDLE_FILE)
    return bundle


def served_format(bundle: dict, serialized_file: str) -> tuple[str, dict]:
    """The format ('torchscript', 'pt2' or 'onnx') and bundle.json's record of the model file an
    archive serves: the handler and `export verify` load the model the way its format needs."""
    for name, record in bundle.get("formats", {}).items():
        if record["file"] == serialized_file:
            return name, record
    raise BundleError(f"bundle.json records no format whose file is {serialized_file!r} (it has "
                      f"{sorted(bundle.get('formats', {}))}): rebuild with `make archive FORMAT=...`")
