"""`edge-fleet serve`: an HTTP file server for update archives, with byte ranges.

Devices download updates resumably: after a dropped connection they ask for the rest with
`Range: bytes=N-`. Python's `http.server.SimpleHTTPRequestHandler` ignores Range, so this is a
small server that honours single ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n` -> 206; past the
end -> 416), serves only regular files directly inside its directory, and nothing else.

Meant for a lab or a site-local network (plain HTTP, no auth): the archive's sha256 in the
update command and the bundle's signature are what make a download trustworthy, not the
transport. In production put the archives behind any web server that supports ranges.

Two test and diagnostic knobs, off by default: `rate_bytes_per_s` throttles each response (so a
test can interrupt a download half-way), and `fail_after_bytes` cuts a response's connection
after that many body bytes, for the first `fail_times` responses (all, if None), to reproduce a
link that drops mid-download.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class ServeKnobs:
    """Test and diagnostic knobs; read on every request, so a test may change them live."""

    rate_bytes_per_s: float | None = None  # throttle each response to about this rate
    fail_after_bytes: int | None = None  # drop the connection after this many body bytes
    fail_times: int | None = None  # ... for this many responses (None = every response)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    """The Range header is valid but asks for bytes the file does not have (416)."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a `Range` header asks for, or None to send the whole file.

    Headers we do not support (several ranges, other units) or cannot parse are ignored, as
    RFC 9110 allows: the client then gets the whole file with 200. Raises Unsatisfiable for a
    range past the end of the file."""
    if header is None:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # bytes=-n: the last n bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # syntactically invalid: ignore the header
    if start >= size:
        raise Unsatisfiable
    end = size - 1 if last == "" else min(int(last), size - 1)
    return ByteRange(start, end)


class RangeFileServer(ThreadingHTTPServer):
    """The files directly inside `root`, one thread per connection, with the knobs applied."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, knobs: ServeKnobs) -> None:
        self.root = root.resolve()
        self.knobs = knobs
        self.failures_done = 0
        self.knob_lock = threading.Lock()
        self.closing = threading.Event()  # set by FileServer.stop: cut responses in flight
        super().__init__(address, _Handler)

    def cut_after(self, length: int) -> int | None:
        """Body bytes a response of `length` bytes may send before its connection is dropped
        (None = all of them)."""
        with self.knob_lock:
            limit, times = self.knobs.fail_after_bytes, self.knobs.fail_times
            if limit is None or limit >= length:
                return None
            if times is not None and self.failures_done >= times:
                return None
            self.failures_done += 1
            return limit


class _Handler(BaseHTTPRequestHandler):
    server: RangeFileServer
    server_version = "edge-fleet-serve"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _respond(self, *, send_body: bool) -> None:
        path = self._resolve()
        if path is None:
            return
        size = path.stat().st_size
        try:
            wanted = parse_range(self.headers.get("Range"), size)
        except Unsatisfiable:
            self._send_error(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                f"{path.name} has {size} bytes",
                {"Content-Range": f"bytes */{size}"},
            )
            return
        with path.open("rb") as f:
            if wanted is None:
                self.send_response(HTTPStatus.OK)
                start, length = 0, size
            else:
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {wanted.start}-{wanted.end}/{size}")
                start, length = wanted.start, wanted.length
            self.send_header("Content-Type", _content_type(path))
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
            self.end_headers()
            if send_body:
                f.seek(start)
                self._send_body(f, length)

    def _send_body(self, f: BinaryIO, length: int) -> None:
        knobs = self.server.knobs
        cut = self.server.cut_after(length)
        sent = 0
        began = time.monotonic()
        try:
            while sent < length:
                if self.server.closing.is_set():
                    self._drop("the server is stopping")
                    return
                step = min(_CHUNK, length - sent)
                if cut is not None:
                    step = min(step, cut - sent)
                    if step <= 0:
                        self._drop(f"fail_after_bytes={cut}")
                        return
                rate = knobs.rate_bytes_per_s
                if rate:
                    step = min(step, max(1, int(rate / 20)))  # ~20 writes a second
                chunk = f.read(step)
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to tell it

    def _drop(self, why: str) -> None:
        log.info("dropping the connection on purpose (%s)", why)
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)

    def _resolve(self) -> Path | None:
        """The file a request names: one regular file directly inside the served directory."""
        name = unquote(urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        if not name:
            self._send_error(HTTPStatus.NOT_FOUND, "name a file: GET /NAME")
            return None
        if any(c in name for c in "/\\\0") or name.startswith("."):
            self._send_error(
                HTTPStatus.FORBIDDEN, f"{name!r}: only files directly in the served directory"
            )
            return None
        candidate = (root / name).resolve()
        if candidate.parent != root or not candidate.is_file():
            self._send_error(HTTPStatus.NOT_FOUND, f"no file {name!r} here")
            return None
        return candidate

    def _send_error(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = f"{status.value} {status.phrase}: {message}\n".encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _content_type(path: Path) -> str:
    if path.suffix == ".tar":
        return "application/x-tar"
    if path.suffix == ".sha256":
        return "text/plain; charset=utf-8"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def make_server(
    directory: Path, host: str = "127.0.0.1", port: int = 8000, knobs: ServeKnobs | None = None
) -> RangeFileServer:
    """A bound server, not yet serving (call `serve_forever`). Raises OSError if the port is
    taken, and NotADirectoryError if `directory` is not one."""
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    return RangeFileServer((host, port), directory, knobs or ServeKnobs())


def serve(
    directory: Path, host: str = "127.0.0.1", port: int = 8000, knobs: ServeKnobs | None = None
) -> None:
    """Serve `directory` until interrupted (Ctrl-C)."""
    with (
        make_server(directory, host, port, knobs) as server,
        contextlib.suppress(KeyboardInterrupt),
    ):
        server.serve_forever()


class FileServer:
    """The server in a background thread, for tests: `with FileServer(dir) as s: s.url_for(n)`.

    Starts on a free port (port 0) unless told otherwise; `knobs` may be changed while it runs.
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        knobs: ServeKnobs | None = None,
    ) -> None:
        self.knobs = knobs or ServeKnobs()
        self._server = make_server(directory, host, port, self.knobs)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{host}:{self.port}/"

    def url_for(self, name: str) -> str:
        return self.base_url + quote(name)

    def start(self) -> FileServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so that stop() returns at once
            name="edge-fleet-serve",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; responses still in flight are cut, as a real outage would."""
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
