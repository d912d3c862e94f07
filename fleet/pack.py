"""Pack a bundle directory into the `.tar` an update command points at (DESIGN.md, "Bundle").

The archive is reproducible: the same bundle always gives the same bytes, so the same sha256.
An operator can rebuild it and compare, and an update command stays valid as long as the bundle
does. That is why every entry has fixed metadata (uid/gid 0, no user names, mode 0644, the
manifest's `created` time) and the entries are in sorted order.

Layout: the bundle's files at the top level of the archive (no directory entry, no `./`
prefix), regular files only: `manifest.json`, `manifest.sig` and every file the manifest lists.
Uncompressed, because ONNX weights do not compress and a device can then unpack with no CPU cost.
POSIX pax format, so a file over 8 GiB (fp32 weights of a 3B model) is still one entry.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, cast

from agent.bundle import read_manifest
from agent.contract.bundle import MANIFEST_FILE as MANIFEST_NAME
from agent.contract.bundle import SIGNATURE_FILE as SIGNATURE_NAME
from agent.contract.bundle import Manifest, bundle_files
from agent.errors import BundleError
from agent.signing import TrustedKey, read_signature, verify_bundle_signature

_CHUNK = 1 << 20
FILE_MODE = 0o644


@dataclass(frozen=True)
class PackResult:
    path: Path
    sha256: str
    size: int
    version: str
    name: str


def pack_bundle(
    bundle_dir: Path,
    out_tar: Path,
    *,
    allow_unsigned: bool = False,
    trusted: Sequence[TrustedKey] | None = None,
) -> PackResult:
    """Write `out_tar` (and `out_tar.sha256`, in `sha256sum` format) from a verified bundle.

    Refused: a bundle without `manifest.sig` (unless `allow_unsigned`, for tests and unsigned
    lab fleets), a malformed signature, a signature by none of `trusted` (when given), and any
    file that does not match the manifest. File hashes are checked while the bytes stream into
    the archive, so what is packed is exactly what was checked, in one read of the weights."""
    bundle_dir = bundle_dir.resolve()
    out_tar = out_tar.resolve()
    manifest = read_manifest(bundle_dir)
    if out_tar.is_relative_to(bundle_dir):
        raise BundleError(
            "bad_output", f"{out_tar} is inside the bundle; write the archive somewhere else"
        )
    signed = (bundle_dir / SIGNATURE_NAME).exists()
    if signed:
        read_signature(bundle_dir)  # well-formed, or BundleError bad_signature
        if trusted is not None:
            verify_bundle_signature(bundle_dir, trusted)
    elif not allow_unsigned:
        raise BundleError(
            "unsigned",
            f"bundle {bundle_dir} has no {SIGNATURE_NAME}; devices refuse unsigned updates. Sign "
            f"it first (`edge-fleet sign {bundle_dir} --key KEY`) or pass --allow-unsigned",
        )
    _check_file_set(bundle_dir, manifest)

    names = sorted([MANIFEST_NAME, *manifest.files, *([SIGNATURE_NAME] if signed else [])])
    mtime = _mtime_of(manifest.created)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    partial = out_tar.with_name(out_tar.name + ".partial")
    try:
        with partial.open("wb") as raw:
            sink = _HashingWriter(raw)
            with tarfile.open(
                fileobj=cast(BinaryIO, sink), mode="w|", format=tarfile.PAX_FORMAT
            ) as tar:
                for name in names:
                    _add(tar, bundle_dir, name, manifest.files.get(name), mtime)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, out_tar)
    finally:
        partial.unlink(missing_ok=True)
    digest = sink.digest.hexdigest()
    sums = out_tar.with_name(out_tar.name + ".sha256")
    sums.write_text(f"{digest}  {out_tar.name}\n", encoding="utf-8")
    return PackResult(
        path=out_tar, sha256=digest, size=sink.size, version=manifest.version, name=manifest.name
    )


def _check_file_set(bundle_dir: Path, manifest: Manifest) -> None:
    """Cheap checks before any byte is hashed: names, presence, sizes, no extra files."""
    problems: list[str] = []
    for rel, entry in sorted(manifest.files.items()):
        path = bundle_dir / rel
        if "/" in rel:
            problems.append(f"{rel}: in a subdirectory (a bundle is flat)")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: missing or not a regular file")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != manifest {entry['size']}")
    extra = set(bundle_files(bundle_dir)) - set(manifest.files)
    problems.extend(f"{rel}: not listed in the manifest" for rel in sorted(extra))
    if problems:
        raise BundleError(
            "tampered",
            f"bundle {bundle_dir} does not match its manifest, refusing to pack it: "
            + "; ".join(problems),
        )


def _add(
    tar: tarfile.TarFile, bundle_dir: Path, name: str, entry: dict[str, object] | None, mtime: int
) -> None:
    path = bundle_dir / name
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mtime = mtime
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    with path.open("rb") as f:
        source = _HashingReader(f)
        try:
            tar.addfile(info, source)
        except OSError as exc:  # tarfile: "unexpected end of data" when a file shrank
            raise BundleError("tampered", f"{name} changed while it was being packed") from exc
    if entry is not None and source.digest.hexdigest() != entry["sha256"]:
        raise BundleError(
            "tampered",
            f"bundle {bundle_dir}: {name}: sha256 does not match the manifest, refusing to pack "
            "it; rebuild or re-copy the bundle",
        )


def _mtime_of(created: str) -> int:
    """The manifest's `created` as a Unix time (0 when it cannot be read): reproducible."""
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0, int(moment.timestamp()))


class _HashingReader:
    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.digest.update(data)
        return data


class _HashingWriter:
    """The archive's sha256 and size, computed as it is written (no second read). tarfile's
    stream mode ("w|") only ever calls `write`, so that is all this implements."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._inner.write(data)
