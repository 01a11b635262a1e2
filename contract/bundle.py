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
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

BUNDLE_FILE = "bundle.json"
# 2: every field below is present (format records, the self-test, the framing recipe with all
# its steps); files of version 1 may lack them and are refused with the way to rebuild them.
FORMAT_VERSION = 2
REQUIRED_INPUT = ("name", "channels", "height", "width", "mean", "std", "framing")
REBUILD = "rebuild it with `make export` (and the archive with `make archive`)"


class BundleError(ValueError):
    """bundle.json is missing, malformed, or does not match the files beside it."""


@dataclass
class Bundle:
    """bundle.json's schema. On disk it stays a plain JSON object (the handler, edge/, the web
    page's JavaScript read it), so readers take `to_dict()` or load_bundle's dict.

    A new optional field is one line here, with its default (`name: dict | None = None`); a
    field that every reader relies on is added without a default and FORMAT_VERSION goes up, so
    that files without it are refused by the version check, not by a KeyError somewhere.
    """
    format_version: int
    model_name: str
    architecture: str
    dataset: str
    classes: list
    input: dict            # name, dtype, layout, channels, height, width, mean, std, framing
    output: dict
    checkpoint: dict       # path, sha256, epoch, chosen_on, the accuracies, splits, trained_on
    files: dict            # {file name: {"sha256", "bytes"}}: everything bundle.json vouches for
    formats: dict          # {format: {"file", "sha256", "bytes", "max_abs_dp", ...}} (formats/)
    export_check: dict
    self_test: dict        # image_png_base64, label, probabilities: what `export verify` runs
    onnx_opset: int
    torch_version: str
    created: str
    edge: dict = field(default_factory=dict)  # {"int8": ..., "ort": ...} after quantize / ort

    @classmethod
    def from_dict(cls, data, source: str = BUNDLE_FILE) -> Bundle:
        """The checked bundle; BundleError names the field, or says how to rebuild an old file."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise BundleError(
                f"{source}: format_version {version!r}, this code reads version {FORMAT_VERSION}: "
                + ("it was written by a newer export; update this checkout" if newer else
                   f"it was written by an older export; {REBUILD}"))
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BundleError(f"{source}: unknown field(s) {', '.join(unknown)}: add them to "
                              "contract/bundle.py's Bundle (and to what writes them)")
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise BundleError(f"{source}: field {f.name!r} is missing; {REBUILD}")
                continue
            kinds = _kinds(hints[f.name])
            if not isinstance(data[f.name], kinds) or isinstance(data[f.name], bool) and bool not in kinds:
                raise BundleError(f"{source}: field {f.name!r} is not a {' or '.join(k.__name__ for k in kinds)}")
        bundle = cls(**data)
        bundle.check(source)
        return bundle

    def check(self, source: str = BUNDLE_FILE) -> None:
        """What the fields' types cannot say: the nested records every reader relies on."""
        missing = [k for k in REQUIRED_INPUT if k not in self.input]
        if missing:
            raise BundleError(f"{source}: input lacks {', '.join(missing)}")
        for fmt, record in self.formats.items():
            if not isinstance(record, dict) or record.get("file") not in self.files:
                raise BundleError(f"{source}: format {fmt!r} names no file that bundle.json records")
        for key in ("image_png_base64", "label", "probabilities"):
            if key not in self.self_test:
                raise BundleError(f"{source}: self_test lacks {key}")

    def to_dict(self) -> dict:
        return asdict(self)


def _kinds(hint) -> tuple[type, ...]:
    """isinstance() classes for a field's annotation (int, dict, dict | None; float takes int)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(o) or o for o in options)
    return kinds + (int,) if float in kinds else kinds


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: Path | str) -> dict:
    """bundle.json (`path` may be its directory), checked against Bundle's schema, as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} not found: run `make export` first") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    return Bundle.from_dict(data, str(path)).to_dict()


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


def write_bundle(bundle: dict | Bundle, path: Path | str) -> Path:
    """bundle.json, checked against the schema and written atomically; `path` may be the file or
    its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_FILE
    data = (bundle if isinstance(bundle, Bundle) else Bundle.from_dict(bundle, str(path))).to_dict()
    write_atomically(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
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
    if any(name in bundle["files"] for name in staged) or (section and section in bundle["edge"]):
        for name in staged:
            bundle["files"].pop(name, None)
        bundle["edge"].pop(section, None)
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
        bundle["edge"][section] = report
    write_bundle(bundle, build_dir / BUNDLE_FILE)
    return bundle


def served_format(bundle: dict, serialized_file: str) -> tuple[str, dict]:
    """The format ('torchscript', 'pt2' or 'onnx') and bundle.json's record of the model file an
    archive serves: the handler and `export verify` load the model the way its format needs."""
    for name, record in bundle["formats"].items():
        if record["file"] == serialized_file:
            return name, record
    raise BundleError(f"bundle.json records no format whose file is {serialized_file!r} (it has "
                      f"{sorted(bundle['formats'])}): rebuild with `make archive FORMAT=...`")
