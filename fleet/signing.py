"""Bundle signing, operator side: make a key pair, sign a bundle, verify one as a device would.

The private key never leaves the operator's machine; devices get only `NAME.pub` (installed in
the agent's `ota.trusted_keys_dir`). The signature format is `agent.signing`'s: base64 of the
Ed25519 signature of the exact bytes of `manifest.json`, in `manifest.sig`.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import open_bundle
from agent.contract.bundle import MANIFEST_FILE as MANIFEST_NAME
from agent.contract.bundle import SIGNATURE_FILE as SIGNATURE_NAME
from agent.errors import BundleError
from agent.signing import (
    PUBLIC_KEY_SUFFIX,
    TrustedKey,
    key_id,
    load_trusted_key,
    load_trusted_keys,
    verify_bundle_signature,
)

PRIVATE_KEY_SUFFIX = ".key"
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def generate_keypair(out_dir: Path, name: str = "fleet") -> tuple[Path, Path]:
    """Write `NAME.key` (PEM PKCS8, mode 0600) and `NAME.pub` (PEM SubjectPublicKeyInfo).

    Refuses to overwrite either file: replacing a signing key by accident would make every
    device refuse the next update signed with it."""
    if not _KEY_NAME_RE.match(name) or name.startswith("."):
        raise BundleError("bad_key", f"key name {name!r}: use 1-64 characters of A-Za-z0-9._-")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = out_dir / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(
                "exists",
                f"{path} already exists, refusing to overwrite a key; choose another --name "
                "or --out",
            )
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` from the start (no window where a key is readable)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise BundleError("exists", f"{path} already exists, refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; set exactly what we mean
        f.write(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError("bad_key", f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            "bad_key",
            f"{path} is not an unencrypted PEM private key ({exc}); use the NAME.key that "
            "`edge-fleet keygen` wrote",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(
            "bad_key", f"{path} holds a {type(key).__name__}, not an Ed25519 private key"
        )
    return key


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> str:
    """Write `manifest.sig` for the bundle; return the signing key's id.

    The bundle is fully verified first (every file against its manifest): signing vouches for
    the files, so a bundle that was already changed or half-copied is never signed. An existing
    signature is replaced (re-signing with another key is allowed)."""
    private_key = load_private_key(private_key_path)
    bundle = open_bundle(bundle_dir)
    manifest_bytes = (bundle.path / MANIFEST_NAME).read_bytes()
    if json.loads(manifest_bytes) != bundle.manifest.raw:
        raise BundleError(
            "tampered", f"{bundle.path / MANIFEST_NAME} changed while it was being verified"
        )
    signature = private_key.sign(manifest_bytes)
    sig_path = bundle.path / SIGNATURE_NAME
    tmp = sig_path.with_name(SIGNATURE_NAME + ".tmp")
    tmp.write_bytes(base64.b64encode(signature) + b"\n")
    os.replace(tmp, sig_path)
    return key_id(private_key.public_key())


def load_trusted(sources: Sequence[Path]) -> list[TrustedKey]:
    """Trusted keys from a mix of `.pub` files and directories of them (as a device holds them)."""
    keys: list[TrustedKey] = []
    for source in sources:
        if source.is_dir():
            found = load_trusted_keys(source)
            if not found:
                raise BundleError("bad_key", f"{source} holds no *{PUBLIC_KEY_SUFFIX} key")
            keys.extend(found)
        elif source.is_file():
            keys.append(load_trusted_key(source))
        else:
            raise BundleError("bad_key", f"trusted key {source} does not exist")
    unique: dict[str, TrustedKey] = {}
    for key in keys:
        unique.setdefault(key.key_id, key)
    return list(unique.values())


@dataclass(frozen=True)
class VerifyReport:
    """What `edge-fleet verify` established about a bundle."""

    bundle: Path
    name: str
    version: str
    key_id: str
    key_path: Path
    files: int
    total_bytes: int


def verify_bundle(bundle_dir: Path, trusted: Sequence[Path]) -> VerifyReport:
    """Verify a bundle exactly as a device will: the signature by a trusted key, then every file
    hash. Raises BundleError (`unsigned`, `bad_signature`, `untrusted`, `tampered`, ...)."""
    keys = load_trusted(trusted)
    signer = verify_bundle_signature(bundle_dir, keys)  # cheap: fail before hashing gigabytes
    bundle = open_bundle(bundle_dir)
    return VerifyReport(
        bundle=bundle.path,
        name=bundle.manifest.name,
        version=bundle.manifest.version,
        key_id=signer.key_id,
        key_path=signer.path,
        files=len(bundle.manifest.files),
        total_bytes=sum(int(e["size"]) for e in bundle.manifest.files.values()),
    )
