"""Keys, signatures and verification, with real Ed25519 keys and real files."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest

from agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from agent.errors import BundleError
from agent.signing import (
    key_id,
    load_public_key,
    load_trusted_keys,
    verify_bundle_signature,
)
from fleet.cli import main
from fleet.signing import generate_keypair, sign_bundle, verify_bundle


def refusal(bundle: Path, trusted: list[Path]) -> BundleError:
    with pytest.raises(BundleError) as info:
        verify_bundle(bundle, trusted)
    return info.value


def test_keygen_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "k", "ops")
    assert (private.name, public.name) == ("ops.key", "ops.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(key_id(load_public_key(public))) == 16


def test_keygen_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    private, _ = keys
    before = private.read_bytes()
    with pytest.raises(BundleError) as info:
        generate_keypair(private.parent, "fleet")
    assert info.value.code == "exists"
    assert private.read_bytes() == before


def test_sign_and_verify_round_trip(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    signer = sign_bundle(bundle, private)
    sig = (bundle / SIGNATURE_NAME).read_bytes()
    assert (
        len(base64.b64decode(sig.strip(), validate=True)) == 64
    )  # base64 of a raw Ed25519 signature
    assert signer == key_id(load_public_key(public))

    for trusted in ([public], [public.parent]):  # a .pub file, or a directory of them
        report = verify_bundle(bundle, trusted)
        assert (report.key_id, report.name, report.version, report.files) == (
            signer,
            "tiny",
            "1",
            3,
        )

    # the device-side API on its own: returns the key that verified
    found = verify_bundle_signature(bundle, load_trusted_keys(public.parent))
    assert found.key_id == signer and found.path == public


def test_unsigned_is_refused(bundle: Path, keys: tuple[Path, Path]) -> None:
    error = refusal(bundle, [keys[1]])
    assert error.code == "unsigned" and "edge-fleet sign" in error.message


def test_signature_by_an_untrusted_key_is_refused(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other_private, _ = generate_keypair(tmp_path / "other", "intruder")
    sign_bundle(bundle, other_private)
    error = refusal(bundle, [keys[1]])
    assert error.code == "untrusted"
    assert key_id(load_public_key(keys[1])) in error.message  # says which keys are trusted


def test_file_changed_after_signing_is_refused(bundle: Path, keys: tuple[Path, Path]) -> None:
    sign_bundle(bundle, keys[0])
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[100] ^= 1
    (bundle / "model.onnx").write_bytes(bytes(data))
    error = refusal(bundle, [keys[1]])
    assert error.code == "tampered" and "model.onnx: sha256" in error.message


def test_manifest_changed_after_signing_is_refused(bundle: Path, keys: tuple[Path, Path]) -> None:
    sign_bundle(bundle, keys[0])
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["version"] = "2"  # still a valid manifest: only the signature can catch it
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    assert refusal(bundle, [keys[1]]).code == "untrusted"


def test_reformatted_manifest_is_refused(bundle: Path, keys: tuple[Path, Path]) -> None:
    """The signature covers the exact bytes: the same JSON, re-serialized, no longer verifies."""
    sign_bundle(bundle, keys[0])
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert refusal(bundle, [keys[1]]).code == "untrusted"


@pytest.mark.parametrize(
    "content",
    [b"not base64!!\n", base64.b64encode(b"\0" * 63), base64.b64encode(b"\0" * 65), b""],
    ids=["not-base64", "too-short", "too-long", "empty"],
)
def test_malformed_signature_is_refused(
    bundle: Path, keys: tuple[Path, Path], content: bytes
) -> None:
    (bundle / SIGNATURE_NAME).write_bytes(content)
    assert refusal(bundle, [keys[1]]).code == "bad_signature"


def test_well_formed_but_wrong_signature_is_untrusted(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    (bundle / SIGNATURE_NAME).write_bytes(base64.b64encode(b"\x01" * 64))
    assert refusal(bundle, [keys[1]]).code == "untrusted"


def test_a_tampered_bundle_is_never_signed(bundle: Path, keys: tuple[Path, Path]) -> None:
    (bundle / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(BundleError) as info:
        sign_bundle(bundle, keys[0])
    assert info.value.code == "tampered"
    assert not (bundle / SIGNATURE_NAME).exists()


def test_a_broken_trusted_key_is_reported_not_skipped(bundle: Path, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "broken.pub").write_text("not a key")
    with pytest.raises(BundleError) as info:
        load_trusted_keys(trusted)
    assert info.value.code == "bad_key" and "broken.pub" in info.value.message
    assert load_trusted_keys(tmp_path / "missing") == []  # the caller says where to install one


def test_cli_keygen_sign_verify(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "fleet.key" in out and "trusted_keys" in out
    assert main(["sign", str(bundle), "--key", str(tmp_path / "k" / "fleet.key")]) == 0
    assert main(["verify", str(bundle), "--trusted", str(tmp_path / "k")]) == 0
    assert capsys.readouterr().out.count("OK: tiny 1") == 1

    (bundle / "tokenizer.json").write_text('{"changed": true}')
    assert main(["verify", str(bundle), "--trusted", str(tmp_path / "k" / "fleet.pub")]) == 1
    assert "[tampered]" in capsys.readouterr().err


@pytest.mark.session_bundle
def test_real_bundle_round_trip(
    default_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    bundle = tmp_path / "smollm2"
    shutil.copytree(default_bundle, bundle, ignore=shutil.ignore_patterns(SIGNATURE_NAME))
    private, public = keys
    with pytest.raises(BundleError):
        verify_bundle(bundle, [public])
    signer = sign_bundle(bundle, private)
    report = verify_bundle(bundle, [public.parent])
    assert report.key_id == signer
    assert report.files == len(json.loads((bundle / MANIFEST_NAME).read_text())["files"])
    assert report.total_bytes > 100_000_000  # the real weights were hashed

    with (bundle / "golden.json").open("ab") as f:
        f.write(b" ")
    assert refusal(bundle, [public]).code == "tampered"
