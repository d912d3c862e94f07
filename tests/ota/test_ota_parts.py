"""The OTA building blocks on real files: command validation, safe unpacking, slots, the
persisted state, probation."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from agent.ota.command import parse_update_command
from agent.ota.errors import OtaError
from agent.ota.probation import ProbationGuard
from agent.ota.slots import Slots
from agent.ota.store import OtaRecord, OtaStore
from agent.ota.unpack import safe_extract

SHA = "a" * 64


def command_bytes(**changes: object) -> bytes:
    body = {"id": "up-1", "url": "http://127.0.0.1:1/b.tar", "sha256": SHA, "size": 10,
            "version": "2"} | changes  # fmt: skip
    return json.dumps(body).encode()


def test_update_command_is_validated() -> None:
    command = parse_update_command(command_bytes(), max_bytes=100)
    assert (command.id, command.size, command.version) == ("up-1", 10, "2")
    for bad in (
        command_bytes(url="file:///etc/passwd"),
        command_bytes(sha256="xyz"),
        command_bytes(size=0),
        command_bytes(size=101),
        command_bytes(id="a b"),
        command_bytes(extra=1),
        b"not json",
    ):
        with pytest.raises(OtaError) as info:
            parse_update_command(bad, max_bytes=100)
        assert info.value.code == "bad_command"


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_safe_extract_writes_regular_files(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "ok.tar", [file_member("a.txt", b"A"), file_member("./b", b"B")])
    dest = tmp_path / "out"
    dest.mkdir()
    assert sorted(safe_extract(archive, dest, max_total_bytes=100)) == ["a.txt", "b"]
    assert (dest / "a.txt").read_bytes() == b"A"


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        (file_member("../escape", b"x"), "leaves the bundle"),
        (file_member("/etc/cron.d/evil", b"x"), "leaves the bundle"),
        (file_member("a/../../escape", b"x"), "leaves the bundle"),
        (link_member("model.onnx", "/etc/shadow", tarfile.SYMTYPE), "link"),
        (link_member("model.onnx", "../x", tarfile.LNKTYPE), "link"),
        (link_member("dev", "", tarfile.CHRTYPE), "special file"),
        (file_member("big", b"x" * 200), "more than 100 bytes"),
    ],
)
def test_safe_extract_refuses_hostile_archives(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], fragment: str
) -> None:
    archive = make_tar(tmp_path / "bad.tar", [file_member("ok", b"1"), member])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(OtaError) as info:
        safe_extract(archive, dest, max_total_bytes=100)
    assert info.value.code == "bad_archive" and fragment in info.value.message
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "escape").exists()


def test_corrupt_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "junk.tar"
    archive.write_bytes(os.urandom(4096))
    with pytest.raises(OtaError) as info:
        safe_extract(archive, tmp_path, max_total_bytes=10**6)
    assert info.value.code == "bad_archive"


def test_slots_switch_atomically_and_never_offer_the_current_one(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "bundles")
    assert slots.current() is None and slots.inactive() == "a"
    slots.prepare("a")
    slots.switch_to("a")
    assert slots.current() == "a" and slots.inactive() == "b"
    assert slots.current_path() == tmp_path / "bundles" / "a"
    slots.prepare("b")
    slots.switch_to("b")
    assert os.readlink(tmp_path / "bundles" / "current") == "b"
    assert not (tmp_path / "bundles" / "current.new").exists()


def test_store_round_trip_and_corrupt_state(tmp_path: Path) -> None:
    store = OtaStore(tmp_path / "ota" / "state.json", max_bytes=100)
    assert store.load() is None
    record = OtaRecord(parse_update_command(command_bytes(), 100), "downloading")
    store.save(record.moved_to("verifying", slot="b", previous="a"))
    loaded = store.load()
    assert loaded is not None and loaded.state == "verifying" and loaded.slot == "b"
    assert loaded.status_payload()["state"] == "verifying"
    store.path.write_text("{half a rec")
    assert store.load() is None and store.path.with_name("state.json.corrupt").exists()


def test_probation_rolls_back_after_repeated_crashes(tmp_path: Path) -> None:
    guard = ProbationGuard(tmp_path, max_crashes=2, window_s=600)
    assert guard.on_start() is None  # no probation yet
    guard.on_clean_exit()
    guard.begin("b", "a", "up-1", "2")
    assert guard.on_start() is None  # previous exit was clean
    # killed: the marker stays
    assert guard.on_start() is None  # first crash
    failed = guard.on_start()  # second crash within the window
    assert failed is not None and failed.previous == "a" and failed.crashes == 2


def test_probation_ends_after_its_window(tmp_path: Path) -> None:
    guard = ProbationGuard(tmp_path, max_crashes=1, window_s=0.01)
    guard.begin("b", "a", "up-1", "2")
    time.sleep(0.05)
    assert guard.on_start() is None and guard.current() is None
