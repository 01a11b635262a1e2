"""release.json: which release of the model an archive is, inside what the signature covers.

    {"model_name": "mnist", "model_version": 20261202001500, "built_at": "2026-12-02T00:15:00Z"}

bundle.json is the export's contract (written once from the checkpoint, the same in build/ and in
every archive made from it); the release is decided when the archive is made, so it is a file of
its own in the archive's root, beside bundle.json and signed with it. A serving host compares
model_version with the highest it has served (serve/trust.py) to refuse a rollback: an older
archive signed by the same key.

model_version is a positive integer that only grows: `export archive --model-version N`, by
default the build time in UTC written as digits (YYYYMMDDHHMMSS), or one more than the archive
already in the model store when that is higher (a clock set back, an N chosen by hand).
"""
from __future__ import annotations

import datetime
import json
import zipfile
from pathlib import Path

from contract.bundle import BundleError

RELEASE_FILE = "release.json"


def make_release(model_name: str, model_version: int, built_at: datetime.datetime) -> dict:
    return {"model_name": model_name, "model_version": int(model_version),
            "built_at": built_at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def check_release(release: object, source: str) -> dict:
    """The release record if well-formed; BundleError naming the field otherwise."""
    if not isinstance(release, dict):
        raise BundleError(f"{source}: {RELEASE_FILE} is not a JSON object")
    version = release.get("model_version")
    if type(version) is not int or version < 1:
        raise BundleError(f"{source}: {RELEASE_FILE} model_version {version!r} is not a positive integer")
    if not isinstance(release.get("model_name"), str):
        raise BundleError(f"{source}: {RELEASE_FILE} has no model_name")
    try:
        datetime.datetime.strptime(release.get("built_at", ""), "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        raise BundleError(f"{source}: {RELEASE_FILE} built_at {release.get('built_at')!r} is not a UTC "
                          "time like 2026-12-02T00:15:00Z") from None
    return release


def read_release(tree: Path) -> dict:
    """The release record of an unpacked (and verified) archive."""
    path = Path(tree) / RELEASE_FILE
    if not path.is_file():
        raise BundleError(f"the archive carries no {RELEASE_FILE} (no model version): it was made "
                          "before archives were versioned; rebuild it with `make archive`")
    try:
        return check_release(json.loads(path.read_text()), RELEASE_FILE)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{RELEASE_FILE} is not valid JSON: {error}") from None


def version_in_store(mar: Path) -> int | None:
    """The model_version of the archive at `mar`, unverified (it only keeps the next default
    above it), or None when there is none or it cannot be read."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return check_release(json.loads(archive.read(RELEASE_FILE)), str(mar))["model_version"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def next_version(built_at: datetime.datetime, current: int | None) -> int:
    """The default model_version: the build time's digits, above the current archive's."""
    stamp = int(built_at.astimezone(datetime.timezone.utc).strftime("%Y%m%d%H%M%S"))
    return max(stamp, (current or 0) + 1)
