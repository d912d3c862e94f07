"""`serve`: a real HTTP server on a free port; ranges, HEAD, refusals and the test knobs."""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.serve import FileServer, ServeKnobs, Unsatisfiable, parse_range

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "bundle.tar").write_bytes(DATA)
    (root / "sub").mkdir()
    (root / "sub" / "inner.tar").write_bytes(b"INNER-CONTENT")
    (tmp_path / "secret.txt").write_text("SECRET-CONTENT")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    (root / ".hidden").write_text("dot")
    with FileServer(root) as server:
        yield server, root


def get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_full_get(served: tuple[FileServer, Path]) -> None:
    status, headers, body = get(served[0].url_for("bundle.tar"))
    assert status == 200 and body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/x-tar"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-199", 100, 199),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-40", 10200, 10239),
        ("bytes=10200-99999", 10200, 10239),  # an end past the file is clamped
        ("bytes=-99999", 0, 10239),  # a suffix longer than the file is the whole file
        ("bytes=10239-10239", 10239, 10239),
    ],
)
def test_range_gets(served: tuple[FileServer, Path], header: str, start: int, end: int) -> None:
    status, headers, body = get(served[0].url_for("bundle.tar"), {"Range": header})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == DATA[start : end + 1]


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-20010", "bytes=-0"])
def test_unsatisfiable_range_is_416(served: tuple[FileServer, Path], header: str) -> None:
    status, headers, _ = get(served[0].url_for("bundle.tar"), {"Range": header})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=9-2", "bytes=x-"])
def test_unsupported_or_invalid_range_sends_the_whole_file(
    served: tuple[FileServer, Path], header: str
) -> None:
    status, _, body = get(served[0].url_for("bundle.tar"), {"Range": header})
    assert status == 200 and body == DATA


def test_head(served: tuple[FileServer, Path]) -> None:
    status, headers, body = get(served[0].url_for("bundle.tar"), method="HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(DATA))
    status, headers, body = get(
        served[0].url_for("bundle.tar"), {"Range": "bytes=5-"}, method="HEAD"
    )
    assert status == 206 and body == b"" and headers["Content-Length"] == str(len(DATA) - 5)


@pytest.mark.parametrize(
    ("raw_path", "status"),
    [
        ("/../secret.txt", 403),
        ("/%2e%2e/secret.txt", 403),
        ("/..%2fsecret.txt", 403),
        ("/sub/inner.tar", 403),  # only files directly in DIR
        ("/.hidden", 403),
        ("/link.txt", 404),  # a symlink out of DIR
        ("/sub", 404),  # a directory is not a file
        ("/missing.tar", 404),
        ("/", 404),
    ],
)
def test_only_files_directly_in_dir_are_served(
    served: tuple[FileServer, Path], raw_path: str, status: int
) -> None:
    # http.client sends the path as given (urllib would normalise the dots away).
    connection = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=10)
    connection.request("GET", raw_path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == status
    assert b"SECRET-CONTENT" not in body and b"INNER-CONTENT" not in body


def test_throttle_slows_each_response(served: tuple[FileServer, Path]) -> None:
    server, _ = served
    server.knobs.rate_bytes_per_s = 20_000
    began = time.monotonic()
    status, _, body = get(server.url_for("bundle.tar"))
    assert status == 200 and body == DATA
    assert time.monotonic() - began >= 0.4  # 10240 bytes at 20 kB/s: about 0.5 s


def test_fail_after_drops_the_connection_and_a_range_resumes(
    served: tuple[FileServer, Path],
) -> None:
    server, _ = served
    server.knobs.fail_after_bytes = 4000
    server.knobs.fail_times = 1
    request = urllib.request.Request(server.url_for("bundle.tar"))
    with (
        urllib.request.urlopen(request, timeout=10) as response,
        pytest.raises(http.client.IncompleteRead) as info,
    ):
        response.read()
    partial = info.value.partial
    assert partial == DATA[:4000]
    status, _, rest = get(server.url_for("bundle.tar"), {"Range": f"bytes={len(partial)}-"})
    assert status == 206 and partial + rest == DATA  # only the first response was cut


def test_stopping_cuts_a_download_in_flight(tmp_path: Path) -> None:
    (tmp_path / "big.tar").write_bytes(DATA * 10)
    server = FileServer(tmp_path, knobs=ServeKnobs(rate_bytes_per_s=50_000)).start()
    response = urllib.request.urlopen(server.url_for("big.tar"), timeout=10)
    response.read(1000)
    server.stop()
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    response.close()


def test_parse_range_unit() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-4", 10) == parse_range("bytes=2-4 ", 10)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)  # nothing in an empty file can be asked for
