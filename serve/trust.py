"""What a serving host trusts before TorchServe starts: the copy it verified, and no rollback.

1. The archive is copied into a private folder (mode 0700, this user's), hashed as it is copied,
   and the copy is made read-only (0400). Only the copy is verified and only the copy is served:
   an archive renamed over model_store/mnist.mar after the check is never seen by TorchServe.
2. `--expect-sha256 DIGEST`: any other archive is refused (the deployment pins the digest).
3. The copy is verified (export/verify.py: structure, signature, hashes, release record).
4. Its release must not be older than the newest this host has served: a state file records the
   highest model version served (and its digest); an archive with a lower version, or the same
   version with another digest, is refused unless --allow-rollback says the operator means it.

The state file, served.json, lives in $MNIST_BUNDLE_STATE_DIR, else $XDG_STATE_HOME/mnist-bundle,
else ~/.local/state/mnist-bundle: a folder of this user's, mode 0700. It is written atomically
(a temporary file, fsync, rename, fsync of the folder). A state file that cannot be read, does not
parse, or that others could have written is an error that says so, never a silent reset: a reset
would let any older archive through.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from contract.bundle import BundleError

STATE_DIR_ENV = "MNIST_BUNDLE_STATE_DIR"
STATE_FILE = "served.json"
STATE_FORMAT = 1
CHUNK = 1 << 20
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class TrustError(BundleError):
    """The archive may not be served on this host: wrong digest, a rollback, or a state file
    that cannot be trusted. The message says what to do."""


def check_digest(digest: str) -> str:
    digest = digest.strip().lower()
    if not DIGEST.match(digest):
        raise TrustError(f"--expect-sha256 {digest!r} is not a SHA-256 digest (64 hex digits, as "
                         "`sha256sum model_store/mnist.mar` prints)")
    return digest


def private_copy(source: Path, folder: Path, name: str) -> tuple[Path, str]:
    """Copy `source` into `folder` (made 0700) as a read-only file, under a temporary name until
    install() gives it `name` once it is verified; (the copy, its SHA-256)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if folder.lstat().st_uid != os.geteuid():
        raise TrustError(f"{folder} belongs to uid {folder.lstat().st_uid}: the verified copy must "
                         "live in a folder of this user's own")
    partial = folder / f".{name}.unverified"
    partial.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with open(source, "rb") as src:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    os.chmod(partial, 0o400)
    return partial, digest.hexdigest()


def install(copy: Path, name: str) -> Path:
    """The verified copy under the name TorchServe loads (replacing the previous verified one)."""
    target = copy.with_name(name)
    os.replace(copy, target)
    return target


def state_dir() -> Path:
    configured = os.environ.get(STATE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "mnist-bundle"


@dataclass(frozen=True)
class Served:
    model_version: int
    sha256: str
    built_at: str


class ServedState:
    """The highest release each model has been served at on this host, in served.json."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else state_dir()
        self.path = self.folder / STATE_FILE

    def _check_owned(self, path: Path, mode_mask: int, fix: str) -> None:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise TrustError(f"the serving state {path} is a link: it must be a file of its own")
        if st.st_uid != os.geteuid():
            raise TrustError(f"the serving state {path} belongs to uid {st.st_uid}, not to you (uid "
                             f"{os.geteuid()}): someone else could have reset it to let an old archive "
                             f"through. Check it, then `sudo chown {os.geteuid()} {path}`")
        mode = stat.S_IMODE(st.st_mode)
        if mode & mode_mask:
            raise TrustError(f"the serving state {path} is writable by others (mode {mode:04o}): it may "
                             f"have been reset to let an old archive through. Check it, then `{fix} {path}`")

    def highest(self, model_name: str) -> Served | None:
        """The highest release served of `model_name`, None when none was; TrustError when the
        state cannot be trusted."""
        if not self.folder.exists():
            return None
        self._check_owned(self.folder, 0o022, "chmod 700")
        if not self.path.exists() and not self.path.is_symlink():
            return None
        self._check_owned(self.path, 0o022, "chmod 600")
        what_to_do = (f"If you know which archive this host served last, delete {self.path} and start "
                      "with --expect-sha256 of that archive; otherwise restore the file from a backup")
        try:
            state = json.loads(self.path.read_text())
            if state.get("format") != STATE_FORMAT or not isinstance(state.get("models"), dict):
                raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT} with a 'models' object")
            record = state["models"].get(model_name)
            if record is None:
                return None
            served = Served(record["model_version"], record["sha256"], record["built_at"])
            if type(served.model_version) is not int or not DIGEST.match(str(served.sha256)):
                raise ValueError(f"the record of {model_name!r} is malformed: {record!r}")
            return served
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise TrustError(f"the serving state {self.path} is corrupt ({type(error).__name__}: "
                             f"{error}): it records the newest model version served here, which "
                             f"guards against rollbacks. {what_to_do}") from None

    def check(self, model_name: str, release: dict, sha256: str, allow_rollback: bool) -> str:
        """Refuse a release older than the highest served (or the same version, other bytes)."""
        highest = self.highest(model_name)
        version = release["model_version"]
        if highest is None:
            return f"the first release of {model_name} served on this host"
        if version > highest.model_version or (version == highest.model_version and sha256 == highest.sha256):
            return f"not older than model version {highest.model_version}, the highest served here"
        if version == highest.model_version:
            problem = (f"has model version {version}, like the archive served here before, but other "
                       f"bytes (SHA-256 {sha256}, served: {highest.sha256}): two archives claim one version")
        else:
            problem = (f"is model version {version} (built {release['built_at']}), older than version "
                       f"{highest.model_version} (built {highest.built_at}) which this host has served")
        if not allow_rollback:
            raise TrustError(f"refusing a rollback: the archive {problem}. Serve the newer archive, "
                             f"or pass --allow-rollback if you mean to go back (state: {self.path})")
        return f"ROLLBACK allowed: the archive {problem}"

    def record(self, model_name: str, release: dict, sha256: str) -> None:
        """Raise the recorded highest release of `model_name` to this one (never lower it)."""
        highest = self.highest(model_name)
        if highest is not None and highest.model_version > release["model_version"]:
            return  # a rollback allowed once stays an exception, not the new floor
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        state = {"format": STATE_FORMAT, "models": {}}
        if self.path.exists():
            state = json.loads(self.path.read_text())
        state["models"][model_name] = {
            "model_version": release["model_version"], "sha256": sha256, "built_at": release["built_at"],
            "served_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        partial = self.folder / f".{STATE_FILE}.{os.getpid()}.partial"
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(state, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
