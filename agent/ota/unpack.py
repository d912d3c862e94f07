"""Unpack a bundle archive without trusting it: regular files only, every name inside the slot,
bounded in count and size."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from agent.ota.errors import OtaError

MAX_FILES = 64


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
