"""Resumable HTTP(S) download of an update archive, checked against its size and sha256.

The partial file survives a crash or a dropped connection; the next attempt asks for the rest
with a `Range` header. A server that ignores Range (200 instead of 206) makes us start over.
Retries are bounded; the hash is computed over the bytes on disk at the end, never trusted from
a partial state.

Bounded in time, whatever the server does: the whole download (retries included) has a deadline,
and over every window of `rate_window_s` seconds at least `min_rate_bps` must arrive, so a server
that trickles one byte every few seconds (each read well inside the per-read timeout) is cut off.
A watch thread enforces both, and the caller's cancel flag, by shutting the socket down: a read
blocked on a silent server returns at once. Redirects follow `follow_redirects`: only to the same
origin (scheme, host, port) by default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urljoin, urlsplit

from agent.ota.errors import OtaError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
SPACE_MARGIN_BYTES = 64 << 20
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_WATCH_INTERVAL_S = 0.2


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


@dataclass(frozen=True)
class DownloadPolicy:
    """How long and how slowly a download may go, and where it may be redirected."""

    deadline_s: float = 3600.0  # the whole download, every attempt and pause included
    min_rate_bps: float = 0.0  # 0 = no minimum
    rate_window_s: float = 60.0
    follow_redirects: str = "same-origin"  # "same-origin" | "any" | "none"
    attempts: int = 5
    timeout_s: float = 30.0  # connect, and each read


class Superseded(OtaError):
    """The caller's cancel flag was set (a newer update command arrived)."""

    def __init__(self) -> None:
        super().__init__("superseded", "cancelled while downloading: a newer update supersedes it")


def download(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Callable[[float], None],
    policy: DownloadPolicy | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Download `url` to `dest` (resuming `dest` if it holds a prefix), then check it."""
    policy = policy or DownloadPolicy()
    with _Watch(policy, cancel or threading.Event()) as watch:
        for attempt in range(1, policy.attempts + 1):
            watch.raise_if_over()
            try:
                _fetch(url, dest, size, progress, policy, watch)
                break
            except OtaError as exc:
                if not exc.transient or attempt == policy.attempts:
                    raise
                delay = min(2.0**attempt, 30.0)
                if delay >= watch.remaining():
                    raise watch.deadline_error(f"the last attempt failed: {exc.message}") from exc
                log.warning(
                    "download attempt %d failed (%s); retrying in %.0f s", attempt, exc, delay
                )
                if watch.cancel.wait(delay):
                    raise Superseded() from exc
    _check(dest, size, sha256)


class _Watch:
    """Deadline, minimum rate and cancel flag for one download, enforced from a thread that
    shuts the current socket down (a read blocked on a silent server returns at once)."""

    def __init__(self, policy: DownloadPolicy, cancel: threading.Event) -> None:
        self.policy = policy
        self.cancel = cancel
        self.started = time.monotonic()
        self.deadline = self.started + policy.deadline_s
        self._cut: OtaError | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._window_start = self.started
        self._window_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-ota-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def deadline_error(self, detail: str = "") -> OtaError:
        took = time.monotonic() - self.started
        return OtaError(
            "download_failed",
            f"the download did not finish within its deadline of {self.policy.deadline_s:.0f} s "
            f"(ota.download_deadline_s; {took:.0f} s spent)" + (f": {detail}" if detail else ""),
        )

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            self._window_start = time.monotonic()
            self._window_bytes = 0

    def received(self, count: int) -> None:
        with self._lock:
            self._window_bytes += count

    def raise_if_over(self) -> None:
        """Raise what is wrong now: cancelled, past the deadline, or a connection the watch cut
        for being too slow."""
        problem = self._check_time()
        if problem is None:
            with self._lock:
                problem, self._cut = self._cut, None
        if problem is not None:
            raise problem

    def _check_time(self) -> OtaError | None:
        if self.cancel.is_set():
            return Superseded()
        if time.monotonic() >= self.deadline:
            return self.deadline_error()
        return None

    def _check_rate(self) -> OtaError | None:
        policy = self.policy
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._window_start
            if self._sock is None or not policy.min_rate_bps or elapsed < policy.rate_window_s:
                return None
            rate = self._window_bytes / elapsed
            self._window_start, self._window_bytes = now, 0
        if rate >= policy.min_rate_bps:
            return None
        return OtaError(
            "download_failed",
            f"the server sent {rate:.0f} bytes/s over the last {elapsed:.0f} s, less than "
            f"ota.download_min_rate_bps = {policy.min_rate_bps:.0f}",
            transient=True,
        )

    def _run(self) -> None:
        while not self._stop.wait(_WATCH_INTERVAL_S):
            problem = self._check_time() or self._check_rate()
            if problem is None:
                continue
            with self._lock:
                sock = self._sock
                if problem.transient:  # too slow: this connection is cut, a retry may do better
                    self._cut = problem
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OtaError("download_failed", f"{url}: not an http:// or https:// URL")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    return connection


def _request(
    url: str, headers: dict[str, str], policy: DownloadPolicy, watch: _Watch
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET `url`, following redirects as the policy allows."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        timeout = max(0.1, min(policy.timeout_s, watch.remaining()))
        connection = _connect(current, timeout)
        try:
            connection.connect()
            watch.attach(connection.sock)
            parts = urlsplit(current)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
        except BaseException:
            watch.attach(None)
            connection.close()
            raise
        if response.status not in REDIRECTS:
            return connection, response
        location = response.getheader("Location")
        watch.attach(None)
        connection.close()
        if not location:
            raise OtaError(
                "download_failed", f"GET {current}: HTTP {response.status} without a Location"
            )
        following = urljoin(current, location)
        allowed = policy.follow_redirects == "any" or (
            policy.follow_redirects == "same-origin" and _origin(following) == _origin(url)
        )
        if not allowed or urlsplit(following).scheme not in ("http", "https"):
            rule = {
                "same-origin": "only redirects to the same scheme, host and port are followed",
                "none": "redirects are not followed",
                "any": "only http(s) redirects are followed",
            }[policy.follow_redirects]
            raise OtaError(
                "download_failed",
                f"GET {url}: the server redirects to {following}, refused: {rule} "
                f'(ota.follow_redirects = "{policy.follow_redirects}")',
            )
        log.info("update download redirected to %s", following)
        current = following
    raise OtaError("download_failed", f"GET {url}: more than {MAX_REDIRECTS} redirects")


def _fetch(
    url: str,
    dest: Path,
    size: int,
    progress: Callable[[float], None],
    policy: DownloadPolicy,
    watch: _Watch,
) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    if have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        connection, response = _request(url, headers, policy, watch)
    except (http.client.HTTPException, OSError) as exc:
        watch.raise_if_over()
        raise OtaError("download_failed", f"GET {url}: {exc}", transient=True) from exc
    try:
        _receive(url, dest, size, have, response, progress, watch)
    finally:
        watch.attach(None)
        connection.close()


def _receive(
    url: str,
    dest: Path,
    size: int,
    have: int,
    response: http.client.HTTPResponse,
    progress: Callable[[float], None],
    watch: _Watch,
) -> None:
    if response.status == 416 and have:  # our partial file is wrong for this server: start over
        dest.unlink()
        raise OtaError("download_failed", "range not satisfiable; restarting", transient=True)
    if response.status not in (200, 206):
        raise OtaError("download_failed", f"GET {url}: HTTP {response.status} {response.reason}")
    if have and response.status != 206:
        have = 0  # the server sent the whole file
    try:
        out = dest.open("ab" if have else "wb")
    except OSError as exc:
        raise _disk_error(dest, exc) from exc
    with out:
        written = have
        while True:
            try:
                chunk = response.read1(_CHUNK)  # whatever has arrived: a trickle is seen
            except (http.client.HTTPException, OSError) as exc:
                watch.raise_if_over()
                raise OtaError(
                    "download_failed", f"connection lost: {exc}", transient=True
                ) from exc
            watch.raise_if_over()
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise _disk_error(dest, exc) from exc
            written += len(chunk)
            watch.received(len(chunk))
            if written > size:
                raise OtaError(
                    "download_failed", f"the server sent more than the {size} bytes announced"
                )
            progress(written / size)
    if dest.stat().st_size < size:
        raise OtaError("download_failed", "the connection closed early", transient=True)


def _disk_error(dest: Path, exc: OSError) -> OtaError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OtaError(
            "no_space", f"the disk holding {dest.parent} filled up during the download ({exc})"
        )
    return OtaError("io_error", f"cannot write the download to {dest}: {exc}")


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
