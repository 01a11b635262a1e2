"""Signatures over what export produces, with the OpenSSF model-signing library (key-based, offline).

    python -m export keys      a new ECDSA P-256 key pair in ~/.config/mnist-bundle/ (never in
                               the repository); `make keys`

The signature covers every file of an unpacked archive (models, bundle.json, the handler, the
contract package, model-config.yaml, TorchServe's MANIFEST.json): model-signing hashes each file
with SHA-256, and the private key signs that list (an in-toto statement in a Sigstore bundle, no
Sigstore service involved). Verifying recomputes the list over the files actually present, so a
changed, added or removed file, or a signature made with another key, is refused by name.

Where the keys are:
    private key   $MNIST_SIGNING_KEY, else ~/.config/mnist-bundle/signing-key.pem (mode 0600)
    public key    $MNIST_SIGNING_PUBLIC_KEY, else ~/.config/mnist-bundle/signing-key.pub
A deployment pins the signer by placing only the public key there (or pointing the variable at
it); a host with neither has no way to tell who made an archive, and says so.

Key files are trusted the way ssh trusts its own (StrictModes): a public key, and every folder
above it, must belong to this user or root and be writable by nobody else (a sticky folder such
as /tmp excepted: others cannot rename what is ours in it); a private key must be readable by its
owner alone. Whoever could replace the public key could get any archive of theirs served. The
refusal names the `chmod` or `chown` that fixes it.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from contract.bundle import BundleError

KEY_DIR = Path.home() / ".config" / "mnist-bundle"
PRIVATE_KEY_ENV, PUBLIC_KEY_ENV = "MNIST_SIGNING_KEY", "MNIST_SIGNING_PUBLIC_KEY"
# Inside the archive, beside TorchServe's own manifest; it is the one file the signature cannot cover.
SIGNATURE_NAME = "MAR-INF/model.sig"


class SignatureError(BundleError):
    """An archive's signature is missing, made by another key, or does not match its files."""


class KeyPermissionError(SignatureError):
    """A key file or a folder above it could be changed (or read) by someone else."""


def _owner_is_trusted(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _check_writable_only_by_owner(path: Path, what: str) -> None:
    st = path.lstat()
    if not _owner_is_trusted(st):
        raise KeyPermissionError(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}) or root: "
            f"they could replace the trusted key. If it is yours: `sudo chown {os.geteuid()} {path}`; "
            "else put the key in a folder of your own")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX):
        raise KeyPermissionError(
            f"{what} {path} is writable by {_writers(mode)} (mode {mode:04o}): whoever can write "
            f"there can replace the trusted key. Run `chmod {mode & ~0o022:04o} {path}`")


def _writers(mode: int) -> str:
    return {0o022: "its group and others", 0o020: "its group", 0o002: "others"}[mode & 0o022]


def check_public_key(path: Path) -> Path:
    """`path` if no one but its owner (this user or root) can replace it: the file, and every
    folder above it; for a link (a mounted Kubernetes secret: signing-key.pub -> ..data/...),
    the link's folders and the file it points to with its folders. Raises KeyPermissionError
    naming the fix."""
    path = Path(path).absolute()
    for folder in path.parents:
        _check_writable_only_by_owner(folder, "folder")
    if path.is_symlink():
        owner = path.lstat().st_uid
        if owner not in (0, os.geteuid()):  # a link's own mode means nothing; its owner does
            raise KeyPermissionError(f"public key link {path} belongs to uid {owner}, not to you or "
                                     f"root: `sudo chown -h {os.geteuid()} {path}` if it is yours")
        target = path.resolve()
        for folder in target.parents:
            _check_writable_only_by_owner(folder, "folder")
    else:
        target = path
    if not target.is_file():
        raise SignatureError(f"public key {path} is not a file")
    _check_writable_only_by_owner(target, "public key")
    return path


def check_private_key(path: Path) -> Path:
    """`path` if it is ours and readable by us alone, as ssh demands of an identity file."""
    st = Path(path).stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        raise KeyPermissionError(f"private key {path} belongs to uid {st.st_uid}, not to you (uid "
                                 f"{os.geteuid()}): `sudo chown {os.geteuid()} {path}` if it is yours")
    if mode & 0o077:
        raise KeyPermissionError(f"private key {path} is readable or writable by others (mode "
                                 f"{mode:04o}): anyone who read it can sign archives as you. Run "
                                 f"`chmod 600 {path}`, and make a new pair (`make keys`) if it may "
                                 "have been copied")
    return Path(path)


def prepare_key_folder(directory: Path) -> Path:
    """The key folder, made or tightened to 0700; refused when it belongs to someone else or a
    folder above it lets others rename it."""
    directory = Path(directory).absolute()
    for folder in directory.parents:
        if folder.exists():
            _check_writable_only_by_owner(folder, "folder")
    if directory.is_symlink():
        raise KeyPermissionError(f"key folder {directory} is a link: make it a folder of your own")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.lstat()
    if st.st_uid != os.geteuid():
        raise KeyPermissionError(f"key folder {directory} belongs to uid {st.st_uid}, not to you (uid "
                                 f"{os.geteuid()}): refusing to keep keys there. If it is yours: "
                                 f"`sudo chown {os.geteuid()} {directory}`; else choose another folder")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        os.chmod(directory, 0o700)
        print(f"[keys] {directory} had mode {mode:04o}: now 0700 (chmod 700)" +
              (". Others could write there: check that the keys in it are the ones you made"
               if mode & 0o022 and any(directory.iterdir()) else ""))
    return directory


def private_key_path() -> Path:
    return Path(os.environ.get(PRIVATE_KEY_ENV) or KEY_DIR / "signing-key.pem").expanduser()


def public_key_path() -> Path | None:
    """The configured public key, or None when no key is configured on this host."""
    configured = os.environ.get(PUBLIC_KEY_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise SignatureError(f"${PUBLIC_KEY_ENV} names {path}, which does not exist")
        return path
    default = KEY_DIR / "signing-key.pub"
    return default if default.exists() or default.is_symlink() else None


def create_key_pair(directory: Path = KEY_DIR) -> tuple[Path, Path]:
    """A new ECDSA P-256 key pair: the private key readable by its owner only. Never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = prepare_key_folder(directory)
    private, public = directory / "signing-key.pem", directory / "signing-key.pub"
    if private.exists() or public.exists():
        if private.exists():
            check_private_key(private)
        if public.exists():
            check_public_key(public)
        raise SignatureError(f"{private} or {public} exists already: keeping it (delete both to "
                             "make a new pair; archives signed with the old key then stop verifying)")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL and mode 0600 from the start: the private key is never readable by others, not even briefly.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    # 0644 whatever the umask: a group-writable public key would be refused by check_public_key.
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def public_key_of(private_key: Path, target: Path) -> Path:
    """Write the public half of `private_key` to `target` (to check a signature just made)."""
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(private_key.read_bytes(), None)
    target.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return target


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 of the PEM public key: the hint model-signing records in each signature."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_public_key(public_key.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _hashing():
    from model_signing import hashing
    # Every file counts: model-signing skips .git* paths by default, which would let an
    # unsigned .gitattributes ride along in a signed archive.
    return (hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[], ignore_git_paths=False))


def sign_tree(tree: Path, signature: Path, private_key: Path) -> None:
    """Sign every file under `tree` into `signature` (a Sigstore bundle, JSON)."""
    from model_signing import signing
    signing.Config().set_hashing_config(_hashing()).use_elliptic_key_signer(
        private_key=private_key).sign(tree, signature)


def verify_tree(tree: Path, signature: Path, public_key: Path) -> None:
    """Raise SignatureError naming what differs unless `signature` by `public_key` covers
    exactly the files under `tree`, byte for byte."""
    from model_signing import verifying
    try:
        verifying.Config().set_hashing_config(_hashing()).use_elliptic_key_verifier(
            public_key=public_key).verify(tree, signature)
    except Exception as error:  # model-signing raises ValueError, cryptography InvalidSignature, ...
        raise SignatureError(_explain(error, public_key)) from None


def _explain(error: Exception, public_key: Path) -> str:
    text = str(error)
    if "Key mismatch" in text or type(error).__name__ == "InvalidSignature":
        return (f"the archive was not signed by the configured public key {public_key} "
                f"(SHA-256 {key_fingerprint(public_key)[:16]}...)")
    if "Signature mismatch" in text:
        text = text.replace("\\'", "'")  # the message is a list's repr, quotes escaped
        changed = re.findall(r"Hash mismatch for '([^']+)'", text)
        added = re.findall(r"Extra files found in model '[^']*': ([^\"'\]]+)", text)
        removed = re.findall(r"Missing files in model '[^']*': ([^\"'\]]+)", text)
        parts = ([f"changed after signing (SHA-256 differs from the signed one): {', '.join(changed)}"] if changed else []) + \
                ([f"added after signing: {', '.join(added)}"] if added else []) + \
                ([f"removed after signing: {', '.join(removed)}"] if removed else [])
        return "; ".join(parts) or text
    return f"the signature cannot be checked: {type(error).__name__}: {text}"
