"""Bundle signatures, device side: is this manifest signed by a key the device trusts?

`manifest.sig` holds the base64 of the Ed25519 signature of the exact bytes of `manifest.json`
(DESIGN.md, "Bundle"). The manifest lists the sha256 of every other file, so one signature over
those few kilobytes vouches for the whole bundle once the file hashes are checked too
(`agent.bundle.open_bundle`). Signing the bytes, not a re-serialized JSON object, means no
canonical-JSON rules to agree on: the device verifies exactly what the operator signed.

There is no private-key code here: a device only ever verifies. Signing is `fleet.signing`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from agent.errors import BundleError

PUBLIC_KEY_SUFFIX = ".pub"
SIGNATURE_BYTES = 64  # an Ed25519 signature is always 64 bytes
_MAX_SIG_FILE_BYTES = 4096  # base64 of 64 bytes is 88 characters; anything huge is not a signature


@dataclass(frozen=True)
class TrustedKey:
    """A public key a device accepts bundles from, and where it came from (for messages)."""

    key_id: str
    path: Path
    public_key: Ed25519PublicKey


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a key: first 16 hex digits of sha256 of its 32 raw bytes.

    Printed by `edge-fleet keygen` and `sign`, so an operator can tell which key signed a bundle
    and which keys a device trusts without comparing PEM blocks."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM SubjectPublicKeyInfo, as `edge-fleet keygen` writes)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError("bad_key", f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            "bad_key",
            f"{path} is not a PEM public key ({exc}); use the NAME.pub that "
            "`edge-fleet keygen` wrote",
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(
            "bad_key",
            f"{path} holds a {type(key).__name__}, not an Ed25519 key; bundles are signed with "
            "Ed25519 keys made by `edge-fleet keygen`",
        )
    return key


def load_trusted_key(path: Path) -> TrustedKey:
    public_key = load_public_key(path)
    return TrustedKey(key_id=key_id(public_key), path=path, public_key=public_key)


def load_trusted_keys(directory: Path) -> list[TrustedKey]:
    """Every `*.pub` in `directory`, sorted by file name, one entry per distinct key.

    A missing directory holds no keys (the caller decides whether that is fatal and says where
    to install one). A file that is not a valid key is an error, not skipped: an operator who
    installed a broken key must learn it now, not when an update is refused."""
    if not directory.is_dir():
        return []
    keys: list[TrustedKey] = []
    seen: set[str] = set()
    for path in sorted(directory.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        if not path.is_file():
            continue
        trusted = load_trusted_key(path)
        if trusted.key_id not in seen:
            seen.add(trusted.key_id)
            keys.append(trusted)
    return keys


def read_signature(bundle_dir: Path) -> bytes:
    """The 64 raw signature bytes from `manifest.sig`, or BundleError `unsigned`/`bad_signature`."""
    sig_path = bundle_dir / SIGNATURE_NAME
    if not sig_path.is_file():
        raise BundleError(
            "unsigned",
            f"bundle {bundle_dir} has no {SIGNATURE_NAME}: sign it with "
            f"`edge-fleet sign {bundle_dir} --key KEY`",
        )
    with sig_path.open("rb") as f:
        text = f.read(_MAX_SIG_FILE_BYTES + 1)
    if len(text) > _MAX_SIG_FILE_BYTES:
        raise BundleError("bad_signature", f"{sig_path} is too large to be a signature")
    try:
        signature = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(
            "bad_signature", f"{sig_path} is not base64 ({exc}); re-sign the bundle"
        ) from exc
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(
            "bad_signature",
            f"{sig_path} decodes to {len(signature)} bytes, an Ed25519 signature has "
            f"{SIGNATURE_BYTES}; re-sign the bundle",
        )
    return signature


def verify_bundle_signature(bundle_dir: Path, trusted: Sequence[TrustedKey]) -> TrustedKey:
    """Check `manifest.sig` against the exact bytes of `manifest.json`; return the key that
    signed it.

    This checks the signature only. The file hashes the manifest lists are checked by
    `agent.bundle.open_bundle`; a bundle is trustworthy when both pass."""
    signature = read_signature(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_NAME
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError("not_a_bundle", f"cannot read {manifest_path}: {exc.strerror}") from exc
    for candidate in trusted:
        try:
            candidate.public_key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return candidate
    if trusted:
        known = ", ".join(f"{k.key_id} ({k.path.name})" for k in trusted)
        detail = f"the trusted keys are {known}"
    else:
        detail = "no key is trusted"
    raise BundleError(
        "untrusted",
        f"{manifest_path} is not signed by a trusted key ({detail}): either the manifest was "
        "changed after signing, or it was signed with another key; re-sign it with a trusted "
        "key, or install the signer's .pub among the trusted keys",
    )
