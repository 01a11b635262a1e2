"""Check a .mar before it is served, reading it the way TorchServe unpacks it.

    python -m export verify model_store/mnist.mar

TorchServe's frontend (ZipUtils.unzip) reads an archive with java.util.zip.ZipInputStream: the
local file headers in order from byte 0, never the central directory; an entry whose name repeats
overwrites the earlier one; names are joined to the destination unchecked, so `../x` lands outside
it. Python's zipfile reads the central directory instead, so one file can show zipfile one set of
files and TorchServe another. Here the local headers are walked like ZipInputStream walks them, and
the archive is refused unless they agree entry for entry with the central directory; unless every
name is a plain relative path, unique, not a link; and unless every member inflates to what it
claims, in proportion to its compressed size, within a total bound (memory stays at one chunk).

Order of checks: structure, then the signature over every unpacked file (export/signing.py), then
bundle.json's SHA-256 sums and the release record (export/release.py: model version, build time),
and only then is the model loaded (its self-test). Nothing from the archive is imported or loaded
before the signature holds. A caller that serves what it verified verifies a private copy
(serve/trust.py): a file that others can rename over could change between check and use.
"""
from __future__ import annotations

import base64
import contextlib
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from contract import TOLERANCE
from contract.bundle import BUNDLE_FILE, BundleError, load_bundle, served_format, sha256_file
from contract.preprocessing import InputSpec, decode_image
from export.release import RELEASE_FILE, read_release
from export.signing import (SIGNATURE_NAME, SignatureError, check_public_key, public_key_path,
                            verify_tree)

MAX_MEMBERS = 1000
MAX_TOTAL_BYTES = 1 << 30  # the whole archive, inflated
# Deflate reaches about 1000:1 on runs of zeros; real members here stay under 10:1 (text, a
# TorchScript zip of float weights). Small members are let through whatever their ratio.
MAX_RATIO, RATIO_FLOOR_BYTES = 100, 1 << 20
CHUNK = 1 << 20

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
LOCAL_SIGNATURE = 0x04034B50
FLAG_ENCRYPTED, FLAG_DATA_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800


class ArchiveError(BundleError):
    """The archive is malformed or unsafe to unpack; the message names the member."""


@dataclass(frozen=True)
class Member:
    name: str
    data_offset: int
    method: int
    crc: int
    compressed: int
    size: int
    is_dir: bool


def check_name(name: str) -> None:
    """A plain relative path with no way out of the folder it is unpacked into."""
    path = PurePosixPath(name)
    if not name or "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"member {name!r} has an absolute or non-portable name")
    if any(part in ("..", ".") for part in path.parts):
        raise ArchiveError(f"member {name!r} has a '..' or '.' path component")


def local_members(mar: Path) -> list[Member]:
    """The members as ZipInputStream sees them, checked against the central directory."""
    try:
        central = zipfile.ZipFile(mar)
    except (zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"{mar} is not a model archive (not a zip file: {error})") from None
    with central, open(mar, "rb") as f:
        listed = sorted(central.infolist(), key=lambda i: i.header_offset)
        if len(listed) > MAX_MEMBERS:
            raise ArchiveError(f"{mar} has {len(listed)} members (limit {MAX_MEMBERS})")
        members, offset, seen = [], 0, set()
        for info in listed:
            if info.header_offset != offset:
                raise ArchiveError(f"{mar}: bytes before or between members at offset {offset} "
                                   f"(TorchServe would read them as entries the listing does not show)")
            f.seek(offset)
            raw = f.read(LOCAL_HEADER.size)
            if len(raw) < LOCAL_HEADER.size:
                raise ArchiveError(f"{mar}: truncated at member {info.filename!r}")
            sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = LOCAL_HEADER.unpack(raw)
            name = f.read(name_len).decode("utf-8" if flags & FLAG_UTF8 else "cp437")
            if sig != LOCAL_SIGNATURE or name != info.filename:
                raise ArchiveError(f"{mar}: the local header at offset {offset} ({name!r}) differs from "
                                   f"the central directory ({info.filename!r})")
            if flags & (FLAG_ENCRYPTED | FLAG_DATA_DESCRIPTOR) or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveError(f"{mar}: member {name!r} is encrypted, streamed or compressed with "
                                   f"method {method}: torch-model-archiver writes none of these")
            if (crc, csize, usize, method) != (info.CRC, info.compress_size, info.file_size, info.compress_type):
                raise ArchiveError(f"{mar}: member {name!r}: local header and central directory "
                                   "disagree on its size, checksum or compression")
            check_name(name)
            key = name.rstrip("/")
            if key in seen:
                raise ArchiveError(f"{mar}: member {name!r} appears twice (TorchServe would keep the "
                                   "last copy, other readers the first)")
            seen.add(key)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"{mar}: member {name!r} is a link or special file, not a plain file")
            data_offset = offset + LOCAL_HEADER.size + name_len + extra_len
            members.append(Member(name, data_offset, method, crc, csize, usize, name.endswith("/")))
            offset = data_offset + csize
        if offset != central.start_dir:
            raise ArchiveError(f"{mar}: {central.start_dir - offset} bytes between the last member and "
                               "the central directory")
    check_sizes(mar, members)
    return members


def check_sizes(mar: Path, members: list[Member]) -> None:
    total = sum(m.size for m in members)
    if total > MAX_TOTAL_BYTES:
        raise ArchiveError(f"{mar} would inflate to {total:,} bytes (limit {MAX_TOTAL_BYTES:,})")
    for m in members:
        if m.size > RATIO_FLOOR_BYTES and m.size > MAX_RATIO * max(m.compressed, 1):
            raise ArchiveError(f"{mar}: member {m.name!r} inflates {m.compressed:,} bytes to "
                               f"{m.size:,} (over {MAX_RATIO}:1): refusing a decompression bomb")


def inflate(f, member: Member, out) -> None:
    """Copy one member's data into `out`, one bounded chunk at a time, refusing any byte beyond
    the size it declares and any checksum that does not match."""
    written, crc = 0, 0

    def emit(chunk: bytes) -> None:
        nonlocal written, crc
        written += len(chunk)
        if written > member.size:
            raise ArchiveError(f"member {member.name!r} inflates beyond the {member.size:,} bytes it "
                               "declares: refusing a decompression bomb")
        crc = zlib.crc32(chunk, crc)
        out.write(chunk)

    f.seek(member.data_offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if member.method == zipfile.ZIP_DEFLATED else None
    remaining = member.compressed
    while remaining:
        data = f.read(min(CHUNK, remaining))
        if not data:
            raise ArchiveError(f"member {member.name!r} is truncated")
        remaining -= len(data)
        if inflater is None:
            emit(data)
        while inflater is not None and data:
            emit(inflater.decompress(data, CHUNK))  # at most CHUNK bytes of output per call
            data = inflater.unconsumed_tail
    if inflater is not None:
        emit(inflater.flush())
    if written != member.size or crc != member.crc:
        raise ArchiveError(f"member {member.name!r} is corrupt (size or CRC-32 does not match)")


def write_member(f, member: Member, target: Path) -> None:
    if member.is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL | O_NOFOLLOW: nothing unpacked earlier can redirect this write.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        inflate(f, member, out)


def unpack(mar: Path, dest: Path) -> list[str]:
    """Unpack `mar` into the empty folder `dest` after every check above; returns the file names."""
    members = local_members(mar)
    dest.mkdir(parents=True, exist_ok=True)
    with open(mar, "rb") as f:
        for member in members:
            try:
                write_member(f, member, dest / member.name)
            except OSError as error:  # a file where a folder must go, or the other way round
                raise ArchiveError(f"{mar}: member {member.name!r} cannot be unpacked: {error}") from None
    return [m.name for m in members if not m.is_dir]


def check_signature(tree: Path, names: list[str], public_key: Path | None, allow_unsigned: bool,
                    check_key_file: bool = True) -> str:
    """'signed by <key>' or 'UNSIGNED'; raises SignatureError when the archive cannot be trusted,
    or when someone other than its owner could have replaced the public key (check_key_file)."""
    signed = SIGNATURE_NAME in names
    if public_key is None:
        message = ("no public key is configured (make keys, or $MNIST_SIGNING_PUBLIC_KEY): nothing "
                   "proves who made this archive or that its handler code is the one exported")
        if not allow_unsigned:
            raise SignatureError(message + "; pass --allow-unsigned to accept that")
        print("[verify] " + "!" * 78 + f"\n[verify] WARNING: {message}.\n[verify] " + "!" * 78)
        (tree / SIGNATURE_NAME).unlink(missing_ok=True)
        return "UNSIGNED (no public key configured)"
    if check_key_file:
        check_public_key(public_key)
    if not signed:
        raise SignatureError(f"the archive carries no signature ({SIGNATURE_NAME}) and this host "
                             f"trusts only archives signed by {public_key}: sign it with `make archive` "
                             "on the machine that holds the private key")
    with tempfile.TemporaryDirectory() as outside:
        # The signature cannot cover itself: take it out of the tree before hashing the rest.
        signature = Path(outside) / "model.sig"
        os.replace(tree / SIGNATURE_NAME, signature)
        verify_tree(tree, signature, public_key)
    return f"signed by {public_key}"


def check_contract(tree: Path, names: list[str]) -> tuple[dict, str]:
    import json
    try:
        manifest = json.loads((tree / "MAR-INF" / "MANIFEST.json").read_text())
        serialized, handler = manifest["model"]["serializedFile"], manifest["model"]["handler"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise BundleError(f"missing or malformed MAR-INF/MANIFEST.json ({error})") from None
    for required in (serialized, handler, BUNDLE_FILE, "contract/preprocessing.py", "formats/__init__.py",
                     RELEASE_FILE):
        if required not in names:
            raise BundleError(f"the archive lacks {required}")
    bundle = load_bundle(tree / BUNDLE_FILE)
    if serialized not in bundle["files"]:
        raise BundleError(f"bundle.json records no SHA-256 for the served model {serialized}")
    for name, entry in bundle["files"].items():
        if name in names and sha256_file(tree / name) != entry["sha256"]:
            raise BundleError(f"{name} has SHA-256 {sha256_file(tree / name)}, bundle.json expects "
                              f"{entry['sha256']}")
    return bundle, serialized


def self_test(bundle: dict, model_path: Path) -> tuple[int, float]:
    """The model's answer to bundle.json's recorded test image: (label, max |dp|), run as its
    format needs (formats/). Only called once the signature and the hashes hold."""
    import formats  # imports torch: not before it is needed

    test = bundle["self_test"]
    x = decode_image(base64.b64decode(test["image_png_base64"]), InputSpec.from_bundle(bundle))
    fmt, record = served_format(bundle, model_path.name)
    p = np.exp(formats.self_test_log_probs(fmt, record, model_path.read_bytes(), x).astype(np.float64))[0]
    return int(p.argmax()), float(np.abs(p - np.array(test["probabilities"])).max())


@dataclass(frozen=True)
class Verified:
    """What a verified archive says of itself: its contract, its release, the file's SHA-256."""
    bundle: dict
    release: dict
    sha256: str


def verify_archive(mar: Path, public_key: Path | None = None, allow_unsigned: bool = False,
                   run_self_test: bool = True, check_key_file: bool = True,
                   unpack_into: Path | None = None) -> dict:
    """verify_archive_release(...).bundle: the archive's bundle.json once it is trusted."""
    return verify_archive_release(mar, public_key, allow_unsigned, run_self_test, check_key_file,
                                  unpack_into).bundle


def verify_archive_release(mar: Path, public_key: Path | None = None, allow_unsigned: bool = False,
                           run_self_test: bool = True, check_key_file: bool = True,
                           unpack_into: Path | None = None) -> Verified:
    """Check `mar` can be trusted; raises BundleError (ArchiveError, SignatureError) naming what
    is wrong. public_key None: the configured one (export/signing.py), if any; check_key_file
    False only for a key this process has just written into a private folder of its own.
    unpack_into: a folder that does not exist yet, where the checked files stay (a server that is
    not TorchServe serves that copy, never the archive it could re-read after the check); None: a
    temporary one."""
    mar = Path(mar)
    if public_key is None:
        public_key = public_key_path()
    with contextlib.ExitStack() as cleanup:
        if unpack_into is None:
            tree = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mar-verify-"))) / "unpacked"
        else:
            tree = Path(unpack_into)
            if tree.exists():
                raise ArchiveError(f"{tree} exists already: archives are unpacked into a new folder only")
        names = unpack(mar, tree)
        try:
            signer = check_signature(tree, names, public_key, allow_unsigned, check_key_file)
        except SignatureError as error:
            raise SignatureError(f"{mar}: {error}") from None
        names = [n for n in names if n != SIGNATURE_NAME]
        try:
            bundle, serialized = check_contract(tree, names)
            release = read_release(tree)
        except BundleError as error:
            raise BundleError(f"{mar}: {error}") from None
        if run_self_test:
            label, max_diff = self_test(bundle, tree / serialized)
            if label != bundle["self_test"]["label"] or max_diff > TOLERANCE:
                raise BundleError(f"{mar}: the model answers label {label} (max |dp| {max_diff:.3g}) "
                                  f"where bundle.json expects label {bundle['self_test']['label']}")
            tested = f"self-test label {label} ({bundle['classes'][label]}), max |dp| {max_diff:.3g}"
        else:
            tested = "no self-test"
    fmt, _ = served_format(bundle, serialized)
    digest = sha256_file(mar)
    print(f"[verify] {mar}: OK: {len(names)} files as TorchServe unpacks them, {signer}, "
          f"bundle.json SHA-256 sums, serves {serialized} ({fmt}), {tested}; model version "
          f"{release['model_version']} built {release['built_at']}; SHA-256 {digest}")
    return Verified(bundle, release, digest)
