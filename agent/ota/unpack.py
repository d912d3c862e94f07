"""Unpack a bundle archive without trusting it: regular files only, every name inside the slot,
bounded in count and size.

`extract_bundle` is what the installer uses: it reads `manifest.json` and `manifest.sig` out of
the archive first (tiny, bounded), lets the caller verify the signature and check the manifest,
and only then writes the files the signed manifest lists, each capped at its declared size and
hashed as it is written. An entry the manifest does not list, or whose header size differs from
the manifest's, is refused before a byte of it is written; so a small archive that would unpack
to gigabytes (a "zip bomb") costs nothing but the read of its headers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from agent.ota.errors import OtaError

MAX_FILES = 64
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1 << 20
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def safe_extract(archive: Path, dest: Path, *, max_total_bytes: int) -> list[str]:
    """Extract `archive` into the empty directory `dest`; returns the names written."""
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise OtaError("bad_archive", f"the update is not a readable tar archive: {exc}") from exc
    written: list[str] = []
    with tar:
        members = _checked_members(tar, max_total_bytes)
        for member in members:
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise OtaError("bad_archive", f"cannot read {member.name!r} from the archive")
            with source, target.open("wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            written.append(member.name)
    return written


def _checked_members(tar: tarfile.TarFile, max_total_bytes: int) -> list[tarfile.TarInfo]:
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OtaError("bad_archive", f"the archive is corrupt: {exc}") from exc
    if len(members) > MAX_FILES:
        raise OtaError("bad_archive", f"the archive has {len(members)} entries (max {MAX_FILES})")
    total = 0
    seen: set[str] = set()
    files = []
    for member in members:
        name = member.name
        path = PurePosixPath(name)
        if member.isdir():
            continue
        if not member.isfile():
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise OtaError("bad_archive", f"the archive holds a {kind} {name!r}: refused")
        if path.is_absolute() or ".." in path.parts or "\\" in name or not name.strip("/"):
            raise OtaError("bad_archive", f"the archive entry {name!r} leaves the bundle: refused")
        member.name = path.as_posix()  # "./x" -> "x"
        if member.name in seen:
            raise OtaError("bad_archive", f"the archive holds {member.name!r} twice")
        seen.add(member.name)
        total += member.size
        if total > max_total_bytes:
            raise OtaError(
                "bad_archive", f"the archive unpacks to more than {max_total_bytes} bytes: refused"
            )
        files.append(member)
    return files


def extract_bundle(
    archive: Path,
    dest: Path,
    *,
    max_total_bytes: int,
    free_margin_bytes: int,
    verify: Callable[[Path], None] | None,
    check_manifest: Callable[[Manifest], None] = lambda manifest: None,
) -> Manifest:
    """Unpack a bundle archive into the empty directory `dest`, trusting nothing before the
    manifest is verified.

    1. `manifest.json` and `manifest.sig` are read from the archive (each bounded) and written to
       `dest`; `verify(dest)` checks the signature (None: unsigned bundles are accepted).
    2. The verified manifest is parsed and passed to `check_manifest` (version, target).
    3. Its declared sizes must fit in min(`max_total_bytes`, free space - `free_margin_bytes`).
    4. Only the files it lists are written, each exactly its declared size and sha256.
    Raises OtaError (`bad_archive`, `tampered`, `no_space`) or the verifier's BundleError. On
    any failure `dest` is emptied: nothing the archive brought stays on the disk."""
    try:
        manifest = _extract_checked(
            archive, dest, max_total_bytes, free_margin_bytes, verify, check_manifest
        )
    except BaseException as exc:
        _empty(dest)
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            raise OtaError(
                "no_space",
                f"the disk holding {dest} filled up while the update was unpacked ({exc}); "
                "everything it wrote was removed. Free some space and send the update again",
            ) from exc
        raise
    return manifest


def _extract_checked(
    archive: Path,
    dest: Path,
    max_total_bytes: int,
    free_margin_bytes: int,
    verify: Callable[[Path], None] | None,
    check_manifest: Callable[[Manifest], None],
) -> Manifest:
    wanted = {MANIFEST_NAME: MAX_MANIFEST_BYTES, SIGNATURE_NAME: MAX_SIGNATURE_BYTES}
    head: dict[str, bytes] = {}
    with _open(archive) as tar:
        for member in _members(tar, max_total_bytes):
            limit = wanted.get(member.name)
            if limit is None:
                continue
            if member.name in head:
                raise OtaError("bad_archive", f"the archive holds {member.name!r} twice")
            if member.size > limit:
                raise OtaError(
                    "bad_archive",
                    f"the archive's {member.name} is {member.size} bytes (max {limit}): refused",
                )
            head[member.name] = _read_member(tar, member)
            if len(head) == len(wanted):
                break
    if MANIFEST_NAME not in head:
        raise OtaError("bad_archive", f"the archive holds no {MANIFEST_NAME}: not a bundle")
    for name, data in head.items():
        (dest / name).write_bytes(data)
    if verify is not None:
        verify(dest)  # raises unsigned / bad_signature / untrusted
    try:
        manifest = parse_manifest(json.loads(head[MANIFEST_NAME]), f"the update's {MANIFEST_NAME}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise OtaError("bad_manifest", f"the update's {MANIFEST_NAME} is not JSON: {exc}") from exc
    check_manifest(manifest)
    declared = {rel: int(entry["size"]) for rel, entry in manifest.files.items()}
    if any(size < 0 for size in declared.values()):
        raise OtaError("bad_manifest", "the manifest declares a negative file size")
    total = sum(declared.values())
    if total > max_total_bytes:
        raise OtaError(
            "bad_archive",
            f"the bundle declares {total} bytes of files, more than ota.max_bundle_bytes = "
            f"{max_total_bytes}: refused",
        )
    free = shutil.disk_usage(dest).free
    if total > free - free_margin_bytes:
        raise OtaError(
            "no_space",
            f"the bundle needs {total / 1e6:.0f} MB (+{free_margin_bytes >> 20} MiB margin) in "
            f"{dest}, only {free / 1e6:.0f} MB are free: nothing was unpacked",
        )
    _write_listed(archive, dest, manifest, declared, max_total_bytes)
    return manifest


def _write_listed(
    archive: Path,
    dest: Path,
    manifest: Manifest,
    declared: dict[str, int],
    max_total_bytes: int,
) -> None:
    written: set[str] = set()
    with _open(archive) as tar:
        for member in _members(tar, max_total_bytes):
            name = member.name
            if name in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            if name not in declared:
                raise OtaError(
                    "bad_archive",
                    f"the archive holds {name!r}, which the signed manifest does not list: refused",
                )
            if name in written:
                raise OtaError("bad_archive", f"the archive holds {name!r} twice")
            if member.size != declared[name]:
                raise OtaError(
                    "bad_archive",
                    f"the archive's {name!r} is {member.size} bytes, the signed manifest says "
                    f"{declared[name]}: refused before unpacking it",
                )
            _copy_member(tar, member, dest / name, str(manifest.files[name]["sha256"]))
            written.add(name)
    missing = sorted(set(declared) - written)
    if missing:
        raise OtaError(
            "tampered",
            f"the archive lacks {', '.join(missing)}, which the signed manifest lists: refused",
        )


def _open(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OtaError("bad_archive", f"the update is not a readable tar archive: {exc}") from exc


def _members(tar: tarfile.TarFile, max_total_bytes: int) -> Iterator[tarfile.TarInfo]:
    """The archive's file entries, one at a time (nothing is read ahead), each checked."""
    seen = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
                raise
            raise OtaError("bad_archive", f"the archive is corrupt: {exc}") from exc
        if member is None:
            return
        seen += 1
        if seen > MAX_FILES:
            raise OtaError("bad_archive", f"the archive has more than {MAX_FILES} entries")
        if member.isdir():
            continue
        _check_member(member)
        if member.issparse():
            raise OtaError("bad_archive", f"the archive entry {member.name!r} is sparse: refused")
        if member.size > max_total_bytes:
            raise OtaError(
                "bad_archive",
                f"the archive entry {member.name!r} is {member.size} bytes, more than "
                f"{max_total_bytes}: refused",
            )
        yield member


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    path = PurePosixPath(name)
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise OtaError("bad_archive", f"the archive holds a {kind} {name!r}: refused")
    if path.is_absolute() or ".." in path.parts or "\\" in name or not name.strip("/"):
        raise OtaError("bad_archive", f"the archive entry {name!r} leaves the bundle: refused")
    member.name = path.as_posix()  # "./x" -> "x"


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    if source is None:
        raise OtaError("bad_archive", f"cannot read {member.name!r} from the archive")
    try:
        with source:
            return source.read(member.size + 1)
    except (tarfile.TarError, EOFError) as exc:
        raise OtaError("bad_archive", f"the archive is corrupt at {member.name!r}: {exc}") from exc


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, sha256: str) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise OtaError("bad_archive", f"cannot read {member.name!r} from the archive")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    left = member.size
    try:
        with source, target.open("xb") as out:
            while left > 0:
                chunk = source.read(min(_CHUNK, left))
                if not chunk:
                    raise OtaError("bad_archive", f"the archive ends inside {member.name!r}")
                left -= len(chunk)
                digest.update(chunk)
                out.write(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise OtaError("bad_archive", f"the archive is corrupt at {member.name!r}: {exc}") from exc
    if digest.hexdigest() != sha256:
        raise OtaError(
            "tampered",
            f"{member.name}: sha256 does not match the signed manifest; the archive was changed "
            "after the bundle was signed: refused",
        )


def _empty(dest: Path) -> None:
    """Remove everything under `dest` (the directory itself stays)."""
    if not dest.is_dir():
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
