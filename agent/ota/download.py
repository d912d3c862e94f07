"""Resumable HTTP(S) download of an update archive, checked against its size and sha256.

The partial file survives a crash or a dropped connection; the next attempt asks for the rest
with a `Range` header. A server that ignores Range (200 instead of 206) makes us start over.
Retries are bounded; the hash is computed over the bytes on disk at the end, never trusted from
a partial state.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent.ota.errors import OtaError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
SPACE_MARGIN_BYTES = 64 << 20


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse before downloading when the archive plus its unpacked copy cannot fit."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN_BYTES:
        raise OtaError(
            "no_space",
            f"the update needs {needed / 1e6:.0f} MB (+{SPACE_MARGIN_BYTES >> 20} MiB margin) "
            f"in {directory}, only {free / 1e6:.0f} MB are free",
        )


def download(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Callable[[float], None],
    attempts: int = 5,
    timeout_s: float = 30.0,
) -> None:
    """Download `url` to `dest` (resuming `dest` if it holds a prefix), then check it."""
    for attempt in range(1, attempts + 1):
        try:
            _fetch(url, dest, size, progress, timeout_s)
            break
        except OtaError as exc:
            if not exc.transient or attempt == attempts:
                raise
            delay = min(2.0**attempt, 30.0)
            log.warning("download attempt %d failed (%s); retrying in %.0f s", attempt, exc, delay)
            time.sleep(delay)
    _check(dest, size, sha256)


def _fetch(
    url: str, dest: Path, size: int, progress: Callable[[float], None], timeout: float
) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    if have == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is wrong for this server: start over
            dest.unlink()
            raise OtaError(
                "download_failed", "range not satisfiable; restarting", transient=True
            ) from exc
        raise OtaError("download_failed", f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise OtaError("download_failed", f"GET {url}: {exc}", transient=True) from exc
    with response:
        if have and response.status != 206:
            have = 0  # the server sent the whole file
        mode = "ab" if have else "wb"
        try:
            with dest.open(mode) as out:
                written = have
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    if written > size:
                        raise OtaError(
                            "download_failed",
                            f"the server sent more than the {size} bytes announced",
                        )
                    progress(written / size)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as exc:
            raise OtaError("download_failed", f"connection lost: {exc}", transient=True) from exc
    if dest.stat().st_size < size:
        raise OtaError("download_failed", "the connection closed early", transient=True)


def _check(dest: Path, size: int, sha256: str) -> None:
    actual_size = dest.stat().st_size
    if actual_size != size:
        dest.unlink()
        raise OtaError("bad_checksum", f"downloaded {actual_size} bytes, the command said {size}")
    digest = hashlib.sha256()
    with dest.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        dest.unlink()
        raise OtaError(
            "bad_checksum",
            f"the archive's sha256 is {digest.hexdigest()}, the command said {sha256}: refused",
        )
