"""Quantized bundles from the default model, each through the accuracy gate: fp16, int8 and int4
for the CPU and for the Orin (TensorRT's Q/DQ ONNX, evaluated here through ONNX Runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from agent.bundle import open_bundle
from agent.canary import check_golden
from agent.runtime import load_model
from build_engine.quantize.common import contrib_ops

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]
COMBINATIONS = [(t, p) for t in ("cpu", "orin") for p in ("fp16", "int8", "int4")]


def edge_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "build_engine", "export", *args],
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def quantized(
    default_bundle: Path, orin_reference: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("quantized")
    built = {}
    # Each target from its own fp32 bundle: the cpu one holds ONNX Runtime's CPU graph already,
    # the orin one the portable graph TensorRT builds.
    references = {"cpu": default_bundle, "orin": orin_reference}
    for target, precision in COMBINATIONS:
        out = root / f"{target}-{precision}"
        result = edge_build("--from-bundle", str(references[target]), "--target", target,
                            "--precision", precision, "--out", str(out))  # fmt: skip
        assert result.returncode == 0, f"{target} {precision}:\n{result.stderr[-3000:]}"
        built[(target, precision)] = out
    return built


@pytest.mark.parametrize(("target", "precision"), COMBINATIONS)
def test_bundle_passes_the_gate_and_records_it(
    quantized: dict[tuple[str, str], Path], target: str, precision: str
) -> None:
    bundle = quantized[(target, precision)]
    manifest = open_bundle(bundle).manifest  # every file hash
    assert manifest.precision == precision
    quality = manifest.quality
    assert quality["gate"] == "passed" and quality["precision"] == precision
    heldout = quality["heldout"]
    assert heldout["top1_agreement"] >= quality["thresholds"]["min_top1"]
    assert heldout["perplexity"]["ratio"] <= quality["thresholds"]["max_ppl_ratio"]
    report = bundle.with_name(bundle.name + ".report.md")
    assert report.is_file() and "top-1" in report.read_text().lower()
    assert bundle.with_name(bundle.name + ".report.svg").is_file()
    assert manifest.raw["build"]["target"] == target
    assert quality["reference_parity"]["ok"] is True  # the reference's check against PyTorch


def test_orin_bundles_are_not_made_from_the_cpu_graph(default_bundle: Path, tmp_path: Path) -> None:
    result = edge_build("--from-bundle", str(default_bundle), "--target", "orin",
                        "--precision", "int8", "--out", str(tmp_path / "orin-int8"))  # fmt: skip
    assert result.returncode == 2
    assert "[bad_reference]" in result.stderr and "--target orin" in result.stderr
    assert not (tmp_path / "orin-int8").exists()


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_orin_graphs_use_standard_onnx_ops_only(
    quantized: dict[tuple[str, str], Path], precision: str
) -> None:
    model = onnx.load(str(quantized[("orin", precision)] / "model.onnx"), load_external_data=False)
    assert contrib_ops(model) == []
    ops = {node.op_type for node in model.graph.node}
    if precision in ("int8", "int4"):
        assert "DequantizeLinear" in ops  # explicit quantization, as TensorRT 10 wants it


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_cpu_bundle_answers_and_reproduces_its_golden(
    quantized: dict[tuple[str, str], Path], precision: str
) -> None:
    bundle = quantized[("cpu", precision)]
    model = load_model(bundle)
    assert check_golden(bundle, model.backend, model.codec) == []
    golden = json.loads((bundle / "golden.json").read_text())
    assert golden["precision"] == precision
    assert all(canary["token_ids"] for canary in golden["canaries"])
    if precision == "fp16":  # lossless here: the same answer as fp32
        assert "Paris" in golden["canaries"][0]["text"]


def test_the_gate_fails_a_broken_quantization(default_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "too-strict"
    result = edge_build("--from-bundle", str(default_bundle), "--precision", "int4",
                        "--min-top1", "0.999", "--out", str(out))  # fmt: skip
    assert result.returncode == 2
    assert "accuracy_gate_failed" in result.stderr and "short by" in result.stderr
    assert not out.exists()  # nothing half-built where an agent could load it
    assert (tmp_path / "too-strict.report.md").is_file()  # but the report says why
