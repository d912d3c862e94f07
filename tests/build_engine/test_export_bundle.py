"""`edge-build export` end to end on the default model (the session's bundle), and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.bundle import open_bundle
from agent.canary import DEFAULT_CANARIES, read_golden


def edge_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "build_engine", *args], capture_output=True, text=True, timeout=600
    )


def test_default_bundle_is_complete_and_verifies(default_bundle: Path) -> None:
    bundle = open_bundle(default_bundle)  # every file's sha256 against the manifest
    manifest = bundle.manifest
    assert set(manifest.files) >= {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "golden.json",
    }
    assert manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    assert manifest.target is None
    assert manifest.arch.layers == 30 and manifest.arch.kv_heads == 3
    assert manifest.arch.head_dim == 64 and manifest.arch.vocab == 49152
    assert manifest.source["model"] == "smollm2-135m" and len(manifest.source["sha256"]) == 64
    # The portable export was checked against PyTorch; this cpu graph, made from it, against that
    # export by the accuracy gate at the fp32 thresholds.
    parity = manifest.quality["reference_parity"]
    assert parity["ok"] is True and parity["max_abs_logit_diff"] <= parity["atol"] * 10
    assert manifest.quality["gate"] == "passed" and manifest.quality["precision"] == "fp32"
    assert manifest.raw["build"]["quantization_details"]["attention"]["applied"] is True
    assert manifest.tokenizer["eos_token_ids"]


def test_golden_canaries_were_recorded(default_bundle: Path) -> None:
    golden = read_golden(default_bundle)
    assert [c.name for c, _, _ in golden] == [c.name for c in DEFAULT_CANARIES]
    assert all(tokens for _, _, tokens in golden)
    capital = json.loads((default_bundle / "golden.json").read_text())["canaries"][0]
    assert "Paris" in capital["text"]


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = edge_build("export", "--model", "smollm2-135m", "--out", str(out))
    assert result.returncode == 2
    assert "already exists; pass --force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "neither an existing path nor a known alias"),
        (["--from-bundle", "/nonexistent/bundle"], "does not exist"),
    ],
)
def test_clear_errors_without_a_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    result = edge_build("export", *args, "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def test_help_teaches_the_model_forms() -> None:
    result = edge_build("--help")
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout and "GGUF" in result.stdout
