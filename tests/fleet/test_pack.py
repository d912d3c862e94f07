"""`pack`: a reproducible, flat tar of a verified bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from agent.errors import BundleError
from agent.signing import load_trusted_keys
from fleet.cli import main
from fleet.pack import pack_bundle
from fleet.signing import generate_keypair, sign_bundle, verify_bundle


def test_pack_is_reproducible_and_flat(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sign_bundle(bundle, keys[0])
    first = pack_bundle(bundle, tmp_path / "a" / "tiny.tar")
    (bundle / "model.onnx").touch()  # a new mtime on disk changes nothing in the archive
    second = pack_bundle(bundle, tmp_path / "b" / "tiny.tar")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert first.size == first.path.stat().st_size
    assert (first.name, first.version) == ("tiny", "1")
    assert (tmp_path / "a" / "tiny.tar.sha256").read_text() == f"{first.sha256}  tiny.tar\n"

    with tarfile.open(first.path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(
        ["golden.json", MANIFEST_NAME, SIGNATURE_NAME, "model.onnx", "tokenizer.json"]
    )
    for member in members:
        assert member.isfile() and "/" not in member.name
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mode == 0o644
        assert member.mtime == 1767323045  # the manifest's `created`, 2026-01-02T03:04:05Z


def test_the_unpacked_archive_verifies(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sign_bundle(bundle, keys[0])
    result = pack_bundle(bundle, tmp_path / "tiny.tar")
    out = tmp_path / "unpacked"
    with tarfile.open(result.path) as tar:
        tar.extractall(out, filter="data")
    assert verify_bundle(out, [keys[1]]).version == "1"


def test_unsigned_is_refused_unless_allowed(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        pack_bundle(bundle, tmp_path / "x.tar")
    assert info.value.code == "unsigned" and "--allow-unsigned" in info.value.message
    assert not (tmp_path / "x.tar").exists()
    result = pack_bundle(bundle, tmp_path / "x.tar", allow_unsigned=True)
    with tarfile.open(result.path) as tar:
        assert SIGNATURE_NAME not in tar.getnames()


def test_tampered_is_refused_and_leaves_no_archive(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sign_bundle(bundle, keys[0])
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[0] ^= 1  # same size: only the hash, computed while packing, can catch it
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        pack_bundle(bundle, tmp_path / "x.tar", allow_unsigned=True)
    assert info.value.code == "tampered" and "model.onnx" in info.value.message
    assert list(tmp_path.glob("x.tar*")) == []


def test_extra_file_and_untrusted_signer_are_refused(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other, _ = generate_keypair(tmp_path / "other", "other")
    sign_bundle(bundle, other)
    with pytest.raises(BundleError) as info:
        pack_bundle(bundle, tmp_path / "x.tar", trusted=load_trusted_keys(keys[1].parent))
    assert info.value.code == "untrusted"
    (bundle / "notes.txt").write_text("hi")
    with pytest.raises(BundleError) as info:
        pack_bundle(bundle, tmp_path / "x.tar")
    assert info.value.code == "tampered" and "notes.txt: not listed" in info.value.message


def test_cli_pack_prints_the_update_command(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sign_bundle(bundle, keys[0])
    out = tmp_path / "www" / "tiny.tar"
    code = main(["pack", str(bundle), "--out", str(out), "--url-base", "http://files:8000"])
    assert code == 0
    printed = capsys.readouterr().out
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    size = out.stat().st_size
    assert (
        f"edge-fleet update --device DEVICE --url http://files:8000/tiny.tar --sha256 {sha} "
        f"--size {size} --version 1" in printed
    )


@pytest.mark.session_bundle
def test_real_bundle_packs(default_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "smollm2"
    shutil.copytree(default_bundle, bundle, ignore=shutil.ignore_patterns(SIGNATURE_NAME))
    sign_bundle(bundle, keys[0])
    result = pack_bundle(bundle, tmp_path / "smollm2.tar")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    with tarfile.open(result.path) as tar:
        names = tar.getnames()
    assert names == sorted([MANIFEST_NAME, SIGNATURE_NAME, *manifest["files"]])
    assert result.version == manifest["version"]
