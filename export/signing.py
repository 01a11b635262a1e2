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
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from contract.bundle import BundleError

KEY_DIR = Path.home() / ".config" / "mnist-bundle"
PRIVATE_KEY_ENV, PUBLIC_KEY_ENV = "MNIST_SIGNING_KEY", "MNIST_SIGNING_PUBLIC_KEY"
# Inside the archive, beside TorchServe's own manifest; it is the one file the signature cannot cover.
SIGNATURE_NAME = "MAR-INF/model.sig"


class SignatureError(BundleError):
    """An archive's signature is missing, made by another key, or does not match its files."""


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
    return default if default.is_file() else None


def create_key_pair(directory: Path = KEY_DIR) -> tuple[Path, Path]:
    """A new ECDSA P-256 key pair: the private key readable by its owner only. Never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = directory / "signing-key.pem", directory / "signing-key.pub"
    if private.exists() or public.exists():
        raise SignatureError(f"{private} or {public} exists already: keeping it (delete both to "
                             "make a new pair; archives signed with the old key then stop verifying)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL and mode 0600 from the start: the private key is never readable by others, not even briefly.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
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
