import json
from pathlib import Path

import pytest

from agent.bundle import MANIFEST_NAME, open_bundle, read_manifest
from agent.errors import BundleError
from tests.conftest import make_synthetic_bundle


def refusal(bundle: Path) -> BundleError:
    with pytest.raises(BundleError) as info:
        open_bundle(bundle)
    return info.value


def test_intact_bundle_opens(tmp_path: Path) -> None:
    bundle = open_bundle(make_synthetic_bundle(tmp_path / "b"))
    assert bundle.manifest.name == "tiny"
    assert set(bundle.manifest.files) == {"model.onnx", "tokenizer.json", "golden.json"}
    assert bundle.manifest.engine_info() == {
        "name": "tiny",
        "version": "1",
        "precision": "fp32",
        "backend": "onnxruntime",
    }


def test_changed_byte_is_refused(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    data = bytearray((root / "model.onnx").read_bytes())
    data[10] ^= 1
    (root / "model.onnx").write_bytes(bytes(data))
    error = refusal(root)
    assert error.code == "tampered" and "model.onnx: sha256" in error.message


def test_missing_truncated_and_extra_files_are_each_named(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    (root / "tokenizer.json").unlink()
    (root / "model.onnx").write_bytes(b"short")
    (root / "evil.py").write_text("print('hi')")
    message = refusal(root).message
    assert "tokenizer.json: missing" in message
    assert "model.onnx: size" in message
    assert "evil.py: not listed" in message


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(format=2), "format 2"),
        (lambda m: m.pop("arch"), "arch"),
        (lambda m: m.update(backend="tpu"), "backend"),
        (lambda m: m["files"].update({"../x": {"sha256": "0", "size": 1}}), "leaves the bundle"),
        (lambda m: m["files"].update({"/etc/passwd": {"sha256": "0", "size": 1}}), "leaves"),
    ],
)
def test_malformed_manifest_is_refused(tmp_path: Path, edit: object, fragment: str) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    edit(manifest)  # type: ignore[operator]
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    error = refusal(root)
    assert error.code == "bad_manifest" and fragment in error.message


def test_not_a_bundle(tmp_path: Path) -> None:
    assert refusal(tmp_path).code == "not_a_bundle"
    assert refusal(tmp_path / "nowhere").code == "not_found"
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError) as info:
        read_manifest(tmp_path)
    assert info.value.code == "bad_manifest"
