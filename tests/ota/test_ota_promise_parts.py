"""The OTA promises at unit level, on real files, real tar/gzip archives, real Ed25519 signatures,
real HTTP servers on loopback and a real small tmpfs: anti-rollback, finished update ids,
verified slot marks, manifest-first unpacking (gzip bombs, a disk that fills), download
deadlines, minimum rate, cancel, and the redirect policy."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from agent.config import AgentConfig, OtaConfig
from agent.errors import AgentError, ConfigError
from agent.ota.boot import roll_back_if_on_failed_probation
from agent.ota.command import parse_update_command
from agent.ota.download import DownloadPolicy, download
from agent.ota.errors import OtaError
from agent.ota.probation import ProbationGuard
from agent.ota.slots import Slots
from agent.ota.store import FINISHED_KEPT, FinishedLog
from agent.ota.unpack import extract_bundle
from agent.ota.versions import HighWater
from agent.signing import load_trusted_keys, verify_bundle_signature
from fleet.serve import FileServer
from fleet.signing import generate_keypair, sign_bundle
from tests.conftest import make_synthetic_bundle, mounted_tmpfs
from tests.ota.test_ota_parts import command_bytes

# --- the command and the version rules -------------------------------------------------------


def test_allow_downgrade_is_an_optional_boolean_command_field() -> None:
    assert parse_update_command(command_bytes(), 100).allow_downgrade is False
    assert parse_update_command(command_bytes(allow_downgrade=True), 100).allow_downgrade
    with pytest.raises(OtaError) as info:
        parse_update_command(command_bytes(allow_downgrade="yes"), 100)
    assert info.value.code == "bad_command" and "allow_downgrade" in info.value.message


def test_high_water_refuses_what_is_not_newer_unless_allowed(tmp_path: Path) -> None:
    mark = HighWater(tmp_path)
    mark.check("1", allow_downgrade=False)  # nothing activated yet: anything goes
    mark.raise_to("2.0")
    mark.raise_to("1.9")  # never goes down
    assert mark.version() == "2.0"
    assert mark.path == tmp_path / "ota" / "high_water.json"  # outside bundles/a and bundles/b
    for version in ("2", "2.0", "1.10", "2.0rc1"):
        with pytest.raises(OtaError) as info:
            mark.check(version, allow_downgrade=False)
        assert info.value.code == "downgrade" and "allow_downgrade" in info.value.message
    mark.check("1.10", allow_downgrade=True)
    mark.check("2.0.post1", allow_downgrade=False)
    mark.check("10", allow_downgrade=False)  # PEP 440, not string, order
    with pytest.raises(OtaError) as info:
        mark.check("v2-beta.final!", allow_downgrade=True)
    assert info.value.code == "bad_version" and "PEP 440" in info.value.message


def test_finished_updates_are_remembered_boundedly(tmp_path: Path) -> None:
    log = FinishedLog(tmp_path / "finished.json")
    for n in range(FINISHED_KEPT + 5):
        log.add({"id": f"u-{n}", "state": "failed", "error": {"code": "x", "message": "m"}})
    log.add({"id": "u-10", "state": "active", "error": None})
    assert log.get("u-0") is None  # the oldest went
    entry = log.get("u-10")
    assert entry is not None and entry["state"] == "active"
    assert len(log.entries()) == FINISHED_KEPT
    assert FinishedLog(tmp_path / "finished.json").get("u-20") is not None  # persisted


def test_ota_config_validates_the_new_keys() -> None:
    assert OtaConfig().follow_redirects == "same-origin"
    with pytest.raises(ConfigError):
        OtaConfig(follow_redirects="sometimes")
    with pytest.raises(ConfigError):
        OtaConfig(download_deadline_s=0)


# --- verified slot marks, boot and probation -------------------------------------------------


def test_a_slot_is_verified_only_while_it_holds_the_marked_manifest(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "bundles")
    make_synthetic_bundle(slots.path("a"), version="2")
    assert slots.verified("a") is None
    slots.mark_verified("a", "2")
    mark = slots.verified("a")
    assert mark is not None and mark.version == "2"
    (slots.path("a") / MANIFEST_NAME).write_text("{}")  # another manifest: no longer the one
    assert slots.verified("a") is None
    slots.mark_verified("a", "2")
    slots.prepare("a")  # emptied for a new candidate: the mark goes with it
    assert slots.marks() == {} and list(slots.path("a").iterdir()) == []


def test_probation_rolls_back_only_into_a_verified_slot(tmp_path: Path) -> None:
    """v2 in slot a, then v3 in slot b on probation; slot a is then overwritten by a candidate
    that never got a mark (say, one that failed its canaries). The probation rollback must not
    go to slot a: it goes to the configured bundle, and the slot that failed is removed."""
    state = tmp_path / "state"
    slots = Slots(state / "bundles")
    make_synthetic_bundle(slots.path("b"), version="3")
    slots.mark_verified("b", "3")
    slots.switch_to("b")
    make_synthetic_bundle(slots.path("a"), version="4")  # unmarked
    guard = ProbationGuard(state, max_crashes=1, window_s=600)
    guard.on_start()
    guard.begin("b", "a", "up-3", "3")  # the agent is now killed: the marker stays
    config = AgentConfig(device_id="d", state_dir=state, bundle=tmp_path / "configured")
    roll_back_if_on_failed_probation(config, guard)
    assert slots.current() is None  # back to the configured bundle
    assert not slots.path("b").exists()  # the bundle that failed its probation is gone


def test_probation_rolls_back_into_a_verified_previous_slot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slots = Slots(state / "bundles")
    make_synthetic_bundle(slots.path("a"), version="2")
    slots.mark_verified("a", "2")
    make_synthetic_bundle(slots.path("b"), version="3")
    slots.mark_verified("b", "3")
    slots.switch_to("b")
    guard = ProbationGuard(state, max_crashes=1, window_s=600)
    guard.on_start()
    guard.begin("b", "a", "up-3", "3")
    roll_back_if_on_failed_probation(AgentConfig(device_id="d", state_dir=state), guard)
    assert slots.current() == "a" and not slots.path("b").exists()


# --- manifest-first unpacking -----------------------------------------------------------------


def signed_bundle(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """A synthetic bundle signed by a fresh key; (bundle dir, trusted keys dir)."""
    key, pub = generate_keypair(tmp_path / "keys", "fleet")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(pub, trusted / "fleet.pub")
    bundle = make_synthetic_bundle(tmp_path / "bundle", version="2", files=files)
    sign_bundle(bundle, key)
    return bundle, trusted


def verifier(trusted: Path) -> Any:
    keys = load_trusted_keys(trusted)
    return lambda directory: verify_bundle_signature(directory, keys)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(bundle: Path, out: Path, *, extra: dict[str, bytes] | None = None) -> Path:
    """Every file of `bundle` (sorted: the manifest is not first) plus `extra`, as a .tar.gz."""
    with tarfile.open(out, "w:gz") as tar:
        for item in sorted(bundle.iterdir()):
            tar.add(item, arcname=item.name)
        for name, data in (extra or {}).items():
            add_bytes(tar, name, data)
    return out


def tar_entry(name: str, data: bytes) -> bytes:
    """One tar entry: header, data, padding to the 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)


def gzip_bomb(bundle: Path, out: Path, name: str, size: int) -> Path:
    """A .tar.gz of `bundle`'s manifest and signature and an entry `name` of `size` zero bytes:
    a few MB that unpack to `size`. Built from repeated gzip members (RFC 1952 allows several;
    Python reads them as one stream) so a test need not deflate gigabytes."""
    prefix = b"".join(
        tar_entry(meta, (bundle / meta).read_bytes())
        for meta in (MANIFEST_NAME, SIGNATURE_NAME)
        if (bundle / meta).exists()
    )
    header = tarfile.TarInfo(name)
    header.size = size
    block = 64 << 20
    assert size % block == 0
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero_member = zeros.compress(bytes(block)) + zeros.flush()
    with out.open("wb") as f:
        f.write(gzip.compress(prefix + header.tobuf(tarfile.PAX_FORMAT)))
        for _ in range(size // block):
            f.write(zero_member)
        f.write(gzip.compress(bytes(1024)))  # end of archive
    return out


def test_the_signed_manifest_is_checked_before_any_file_is_written(tmp_path: Path) -> None:
    bundle, trusted = signed_bundle(tmp_path, {"model.onnx": b"graph" * 100, "golden.json": b"{}"})
    archive = pack(bundle, tmp_path / "ok.tar.gz")
    dest = tmp_path / "slot"
    dest.mkdir()
    manifest = extract_bundle(
        archive, dest, max_total_bytes=10**6, free_margin_bytes=0, verify=verifier(trusted)
    )
    assert manifest.version == "2"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in bundle.iterdir())

    # Signed by another key: refused with only the manifest and signature ever written.
    other, _ = generate_keypair(tmp_path / "other", "intruder")
    sign_bundle(bundle, other)
    seen: list[list[str]] = []

    def refuse(directory: Path) -> None:
        seen.append(sorted(p.name for p in directory.iterdir()))
        verifier(trusted)(directory)

    shutil.rmtree(dest)
    dest.mkdir()
    with pytest.raises(AgentError) as info:
        extract_bundle(
            pack(bundle, tmp_path / "other.tar.gz"), dest, max_total_bytes=10**6,
            free_margin_bytes=0, verify=refuse,
        )  # fmt: skip
    assert info.value.code == "untrusted"
    assert seen == [[MANIFEST_NAME, SIGNATURE_NAME]]
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        ({"payload.bin": b"x" * 4096}, "bad_archive", "does not list"),
        ({"model.onnx": b"y" * 500}, "bad_archive", "twice"),
    ],
)
def test_entries_the_signed_manifest_does_not_list_are_refused(
    tmp_path: Path, extra: dict[str, bytes], code: str, fragment: str
) -> None:
    bundle, trusted = signed_bundle(tmp_path, {"model.onnx": b"graph" * 100})
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(OtaError) as info:
        extract_bundle(
            pack(bundle, tmp_path / "x.tar.gz", extra=extra), dest, max_total_bytes=10**6,
            free_margin_bytes=0, verify=verifier(trusted),
        )  # fmt: skip
    assert info.value.code == code and fragment in info.value.message
    assert list(dest.iterdir()) == []


def test_a_file_changed_after_signing_is_refused_and_removed(tmp_path: Path) -> None:
    bundle, trusted = signed_bundle(tmp_path, {"model.onnx": b"graph" * 100})
    (bundle / "model.onnx").write_bytes(b"GRAPH" * 100)  # same size, other bytes
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(OtaError) as info:
        extract_bundle(
            pack(bundle, tmp_path / "t.tar.gz"), dest, max_total_bytes=10**6,
            free_margin_bytes=0, verify=verifier(trusted),
        )  # fmt: skip
    assert info.value.code == "tampered" and "model.onnx" in info.value.message
    assert list(dest.iterdir()) == []


def test_a_gzip_bomb_is_refused_before_it_writes_more_than_its_manifest_allows(
    tmp_path: Path,
) -> None:
    """2 MB of gzip that unpacks to 2 GiB, into a 64 MiB disk: refused from the tar header
    (its size is not the signed manifest's), with nothing left in the slot. Unpacked first and
    checked after, it would fill the disk (and did)."""
    bundle, trusted = signed_bundle(tmp_path, {"model.onnx": b"graph" * 100})
    bomb = gzip_bomb(bundle, tmp_path / "bomb.tar.gz", "model.onnx", 2 << 30)
    assert bomb.stat().st_size < 4 << 20
    with mounted_tmpfs(tmp_path / "disk", "64m") as disk:
        dest = disk / "slot"
        dest.mkdir()
        with pytest.raises(OtaError) as info:
            extract_bundle(
                bomb, dest, max_total_bytes=32 << 30, free_margin_bytes=0,
                verify=verifier(trusted),
            )  # fmt: skip
        assert info.value.code == "bad_archive", info.value
        assert "2147483648 bytes" in info.value.message and "500" in info.value.message
        assert list(dest.iterdir()) == []
        assert shutil.disk_usage(disk).used < 1 << 20


def test_a_bomb_whose_manifest_declares_the_huge_file_is_capped_by_free_space(
    tmp_path: Path,
) -> None:
    bundle, trusted = signed_bundle(tmp_path, {"model.onnx": bytes(256 << 20)})
    bomb = gzip_bomb(bundle, tmp_path / "bomb.tar.gz", "model.onnx", 256 << 20)
    with mounted_tmpfs(tmp_path / "disk", "64m") as disk:
        dest = disk / "slot"
        dest.mkdir()
        with pytest.raises(OtaError) as info:
            extract_bundle(
                bomb, dest, max_total_bytes=32 << 30, free_margin_bytes=0,
                verify=verifier(trusted),
            )  # fmt: skip
        assert info.value.code == "no_space" and "nothing was unpacked" in info.value.message
        assert list(dest.iterdir()) == []
    dest = tmp_path / "big-slot"
    dest.mkdir()
    with pytest.raises(OtaError) as info:  # and by ota.max_bundle_bytes
        extract_bundle(
            bomb, dest, max_total_bytes=1 << 20, free_margin_bytes=0, verify=verifier(trusted)
        )
    assert info.value.code == "bad_archive" and "max_bundle_bytes" in info.value.message
    assert list(dest.iterdir()) == []


def test_a_disk_that_fills_while_unpacking_ends_no_space_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """The declared sizes fit the free bytes, but files take whole pages: the last one hits
    ENOSPC for real. The error is coded, and what was written is removed."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        dest = disk / "slot"
        dest.mkdir()
        # manifest.json and manifest.sig take one page each once written
        pages = shutil.disk_usage(disk).free // 4096 - 2
        files = {"a.bin": b"a", "b.bin": b"b" * ((pages - 1) * 4096 + 1)}  # needs pages + 1
        bundle, trusted = signed_bundle(tmp_path, files)
        archive = pack(bundle, tmp_path / "fill.tar.gz")
        with pytest.raises(OtaError) as info:
            extract_bundle(
                archive, dest, max_total_bytes=10**9, free_margin_bytes=0,
                verify=verifier(trusted),
            )  # fmt: skip
        assert info.value.code == "no_space" and "filled up" in info.value.message
        assert list(dest.iterdir()) == []


def test_an_unsigned_bundle_is_still_capped_by_its_manifest(tmp_path: Path) -> None:
    """require_signature = false: no verifier, yet the manifest is read first and caps every
    entry at its declared size."""
    bundle = make_synthetic_bundle(tmp_path / "bundle", files={"model.onnx": b"m" * 10})
    bomb = gzip_bomb(bundle, tmp_path / "bomb.tar.gz", "model.onnx", 64 << 20)
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(OtaError) as info:
        extract_bundle(bomb, dest, max_total_bytes=1 << 30, free_margin_bytes=0, verify=None)
    assert info.value.code == "bad_archive" and "signed manifest says 10" in info.value.message
    assert list(dest.iterdir()) == []


# --- downloads: deadline, minimum rate, cancel, redirects -----------------------------------


class Trickle(BaseHTTPRequestHandler):
    """Announces 100 kB, then sends one byte every `interval` seconds."""

    interval = 0.5

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(self.interval)
        except OSError:
            return  # the client gave up

    def log_message(self, format: str, *args: Any) -> None:
        pass


def redirector(target: str) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            location = target if target.startswith("http") else target + self.path
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Redirect


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def trickle() -> Iterator[str]:
    yield from serve(Trickle)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[FileServer, bytes]]:
    www = tmp_path / "www"
    www.mkdir()
    data = b"archive-bytes" * 5000
    (www / "a.tar").write_bytes(data)
    with FileServer(www) as server:
        yield server, data


def fetch(url: str, dest: Path, size: int, sha: str, **policy: Any) -> None:
    cancel = policy.pop("cancel", None)
    download(url, dest, size=size, sha256=sha, progress=lambda f: None,
             policy=DownloadPolicy(**policy), cancel=cancel)  # fmt: skip


def test_a_trickling_server_is_cut_off_at_the_deadline(trickle: str, tmp_path: Path) -> None:
    with pytest.raises(OtaError) as info:
        fetch(f"{trickle}/a.tar", tmp_path / "a.tar", 100000, "0" * 64, deadline_s=3.0)
    assert info.value.code == "download_failed"
    assert "deadline of 3 s" in info.value.message


def test_a_trickling_server_is_cut_off_below_the_minimum_rate(trickle: str, tmp_path: Path) -> None:
    with pytest.raises(OtaError) as info:
        fetch(f"{trickle}/a.tar", tmp_path / "a.tar", 100000, "0" * 64, deadline_s=600,
              min_rate_bps=1000, rate_window_s=1.0, attempts=1)  # fmt: skip
    assert info.value.code == "download_failed" and "download_min_rate_bps" in info.value.message


def test_a_cancelled_download_stops_with_superseded(trickle: str, tmp_path: Path) -> None:
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(OtaError) as info:
        fetch(f"{trickle}/a.tar", tmp_path / "a.tar", 100000, "0" * 64, cancel=cancel)
    assert info.value.code == "superseded"


def test_a_redirect_to_another_origin_is_refused_by_default(
    files: tuple[FileServer, bytes], tmp_path: Path
) -> None:
    server, data = files
    sha = hashlib.sha256(data).hexdigest()
    target = server.url_for("a.tar")  # another port: another origin
    for redirect in serve(redirector(target)):
        with pytest.raises(OtaError) as info:
            fetch(f"{redirect}/a.tar", tmp_path / "a.tar", len(data), sha)
        assert info.value.code == "download_failed" and target in info.value.message
        assert not (tmp_path / "a.tar").exists()
        with pytest.raises(OtaError):
            fetch(f"{redirect}/a.tar", tmp_path / "a.tar", len(data), sha,
                  follow_redirects="none")  # fmt: skip
        fetch(f"{redirect}/a.tar", tmp_path / "a.tar", len(data), sha, follow_redirects="any")
        assert (tmp_path / "a.tar").read_bytes() == data


class SameOrigin(BaseHTTPRequestHandler):
    """/old/a.tar redirects to /a.tar on the same server, which serves the file."""

    data = b""

    def do_GET(self) -> None:
        if self.path.startswith("/old/"):
            self.send_response(301)
            self.send_header("Location", self.path[len("/old") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_redirect_within_the_origin_is_followed(tmp_path: Path) -> None:
    SameOrigin.data = json.dumps({"bundle": "bytes"}).encode() * 100
    sha = hashlib.sha256(SameOrigin.data).hexdigest()
    for base in serve(SameOrigin):
        fetch(f"{base}/old/a.tar", tmp_path / "a.tar", len(SameOrigin.data), sha)
    assert (tmp_path / "a.tar").read_bytes() == SameOrigin.data
