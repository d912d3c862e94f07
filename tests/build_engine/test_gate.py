"""The accuracy gate, its report and the calibration text loader, on the tiny random Llama.

The gate's verdicts are tested where they can be stated exactly: a graph against itself agrees
100% with a perplexity ratio of exactly 1.0, a corrupted copy fails with a message naming each
missed threshold and the shortfall, and an impossible threshold fails even an identical graph.
Short held-out windows keep every evaluation to about a second.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.canary import golden_document, run_canaries
from agent.contract.bundle import GOLDEN_FILE
from agent.text import TextCodec
from build_engine.calibration import (
    CALIBRATION_FILE,
    HELDOUT_FILE,
    heldout_samples,
    load_text_samples,
    split_passages,
)
from build_engine.errors import BuildError
from build_engine.gate import GATE_FAILED, GateReport, Thresholds, evaluate
from build_engine.onnx_export import ExportResult
from build_engine.report import write_report

DATA = Path(__file__).resolve().parents[2] / "build_engine" / "data"
EOS = [2]  # the tiny model's eos_token_id
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def codec(tokenizer_dir: Path) -> TextCodec:
    return TextCodec(tokenizer_dir, eos_token_ids=EOS)


@pytest.fixture(scope="module")
def reference_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_export: ExportResult, codec: TextCodec
) -> Path:
    """A directory with the golden.json the tiny fp32 graph produced (what export records)."""
    bundle = tmp_path_factory.mktemp("gate-reference")
    backend = OnnxRuntimeBackend(tiny_export.onnx_path, max_seq_len=512)
    try:
        results = run_canaries(backend, codec)
    finally:
        backend.close()
    document = golden_document(results, "onnxruntime", "fp32")
    (bundle / GOLDEN_FILE).write_text(json.dumps(document), encoding="utf-8")
    return bundle


@pytest.fixture(scope="module")
def heldout(codec: TextCodec) -> list[list[int]]:
    return heldout_samples(codec, seq_len=64, max_samples=4)


@pytest.fixture(scope="module")
def self_report(
    tiny_export: ExportResult, codec: TextCodec, reference_bundle: Path, heldout: list[list[int]]
) -> GateReport:
    return evaluate(
        tiny_export.onnx_path,
        tiny_export.onnx_path,
        codec,
        reference_bundle,
        precision="int8",
        heldout=heldout,
    )


@pytest.fixture(scope="module")
def corrupted_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_export: ExportResult) -> Path:
    """A copy of the tiny graph with its layer weights and its (tied) embedding scaled by 8.

    The layers change which token wins (top-1); the embedding, which is also the LM head, makes
    the wrong answers confident (perplexity): a random model's near-uniform distribution would
    otherwise hide any damage from the perplexity ratio.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_export.onnx_path))  # loads the external data too
    initializers = {i.name: i for i in model.graph.initializer}
    scaled = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or "/layers." not in node.name:
            continue
        for name in node.input:
            if name in initializers:
                tensor = initializers[name]
                weights = numpy_helper.to_array(tensor) * np.float32(8.0)
                tensor.CopyFrom(numpy_helper.from_array(weights, name))
                scaled += 1
    assert scaled == 14  # 7 projections in each of the 2 layers
    gather = next(n for n in model.graph.node if n.name == "/model/embed_tokens/Gather")
    embedding = initializers[gather.input[0]]  # its name depends on the tied-weight dedupe
    embedding.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(embedding) * np.float32(8.0), embedding.name)
    )
    out = tmp_path_factory.mktemp("gate-corrupted") / "model.onnx"
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return out


@pytest.fixture(scope="module")
def corrupted_report(
    corrupted_onnx: Path,
    tiny_export: ExportResult,
    codec: TextCodec,
    reference_bundle: Path,
    heldout: list[list[int]],
) -> GateReport:
    return evaluate(
        tiny_export.onnx_path,
        corrupted_onnx,
        codec,
        reference_bundle,
        precision="int8",
        heldout=heldout,
    )


# --- the gate ------------------------------------------------------------------------------------


def test_a_graph_passes_against_itself(self_report: GateReport) -> None:
    assert self_report.top1_agreement == 1.0
    assert self_report.ppl_ratio == 1.0
    assert self_report.reference_ppl == self_report.candidate_ppl > 1.0
    assert self_report.golden_mean == 1.0
    assert self_report.golden_exact == len(self_report.canaries) == 5
    assert all(value == 1.0 for value in self_report.top1_by_bucket)
    assert self_report.nonfinite_positions == 0
    assert self_report.positions == 4 * 64
    assert self_report.passed
    assert self_report.failures == []
    self_report.raise_if_failed()  # does not raise


def test_a_corrupted_graph_fails_with_every_shortfall_named(corrupted_report: GateReport) -> None:
    report = corrupted_report
    assert not report.passed
    assert report.top1_agreement < 0.5
    assert report.ppl_ratio > 1.5
    assert report.golden_mean < 0.1
    failures = report.failures
    t = Thresholds.for_precision("int8")
    top1 = next(f for f in failures if f.startswith("top-1 agreement"))
    assert f"{report.top1_agreement:.3f} is below the int8 threshold {t.min_top1:.3f}" in top1
    assert f"(short by {t.min_top1 - report.top1_agreement:.3f})" in top1
    ppl = next(f for f in failures if f.startswith("perplexity ratio"))
    assert f"{report.ppl_ratio:.3f} (candidate" in ppl
    assert f"is above the int8 threshold {t.max_ppl_ratio:.3f} (over by" in ppl
    golden = next(f for f in failures if f.startswith("golden greedy agreement"))
    assert f"below the int8 threshold {t.min_golden:.3f}" in golden
    with pytest.raises(BuildError) as caught:
        report.raise_if_failed()
    assert caught.value.code == GATE_FAILED
    for failure in failures:
        assert failure in caught.value.message


def test_an_impossible_threshold_fails_an_identical_graph(
    tiny_export: ExportResult, codec: TextCodec, reference_bundle: Path, heldout: list[list[int]]
) -> None:
    absurd = Thresholds(min_top1=1.01, max_ppl_ratio=1.0, min_golden=1.0)
    report = evaluate(
        tiny_export.onnx_path,
        tiny_export.onnx_path,
        codec,
        reference_bundle,
        precision="fp16",
        thresholds=absurd,
        heldout=heldout[:1],
    )
    assert report.top1_agreement == 1.0
    assert report.failures == [
        "top-1 agreement 1.000 is below the fp16 threshold 1.010 (short by 0.010)"
    ]
    with pytest.raises(BuildError, match=r"short by 0\.010"):
        report.raise_if_failed()


def test_nan_logits_never_pass(self_report: GateReport) -> None:
    broken = replace(self_report, candidate_ppl=float("nan"), nonfinite_positions=3)
    assert not broken.passed
    assert any("NaN/inf logits at 3 of" in f for f in broken.failures)
    assert any(f.startswith("perplexity ratio nan") for f in broken.failures)
    assert broken.to_dict()["heldout"]["perplexity"]["candidate"] is None


def test_report_dict_is_strict_json(self_report: GateReport, corrupted_report: GateReport) -> None:
    for report in (self_report, corrupted_report):
        data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        assert data["gate"] == ("passed" if report.passed else "failed")
        assert data["thresholds"] == Thresholds.for_precision("int8").to_dict()
        assert data["heldout"]["positions"] == 256
        assert len(data["golden"]["canaries"]) == 5
        assert data["failures"] == report.failures
        assert "reference" not in data  # the pipeline adds its own `reference` key


def test_thresholds_defaults_and_overrides() -> None:
    fp16 = Thresholds.for_precision("fp16")
    assert fp16 == Thresholds(min_top1=0.98, max_ppl_ratio=1.01, min_golden=0.80)
    int8 = Thresholds.for_precision("int8")
    int4 = Thresholds.for_precision("int4")
    # A lower precision never gets stricter thresholds.
    assert int8.min_top1 <= fp16.min_top1
    assert int8.max_ppl_ratio >= fp16.max_ppl_ratio
    assert int4.min_top1 <= int8.min_top1
    assert int4.max_ppl_ratio >= int8.max_ppl_ratio
    assert int4.min_golden <= int8.min_golden
    tuned = Thresholds.for_precision("int4", min_top1=0.5, max_ppl_ratio=2.0)
    assert (tuned.min_top1, tuned.max_ppl_ratio, tuned.min_golden) == (0.5, 2.0, int4.min_golden)
    for bad in ({"min_top1": 98.0}, {"max_ppl_ratio": 0.9}, {"min_golden": float("nan")}):
        with pytest.raises(BuildError) as caught:
            Thresholds.for_precision("int8", **bad)
        assert caught.value.code == "bad_arguments"
    with pytest.raises(BuildError, match="unknown threshold"):
        Thresholds.for_precision("int8", min_top5=0.9)
    with pytest.raises(BuildError, match="no accuracy thresholds"):
        Thresholds.for_precision("int3")


def test_missing_golden_is_a_build_error(
    tiny_export: ExportResult, codec: TextCodec, tmp_path: Path, heldout: list[list[int]]
) -> None:
    with pytest.raises(BuildError) as caught:
        evaluate(
            tiny_export.onnx_path,
            tiny_export.onnx_path,
            codec,
            tmp_path,
            precision="int8",
            heldout=heldout[:1],
        )
    assert caught.value.code == "bad_reference"


# --- the report ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["passed", "failed"])
def test_report_markdown_and_svg(
    which: str, self_report: GateReport, corrupted_report: GateReport, tmp_path: Path
) -> None:
    report = self_report if which == "passed" else corrupted_report
    out = tmp_path / "tiny-int8.report.md"
    write_report(
        report,
        out,
        bundle_name="tiny <llama> int8 cpu",
        precision="int8",
        target="cpu",
        sizes={"fp32": 4_000_000, "int8": 1_100_000},
    )
    markdown = out.read_text(encoding="utf-8")
    svg = out.with_suffix(".svg")
    assert f"]({svg.name})" in markdown
    assert ("**PASSED**" in markdown) == report.passed
    assert ("**FAILED**" in markdown) == (not report.passed)
    for failure in report.failures:
        assert failure in markdown
    assert "| capital |" in markdown
    assert "0.28x" in markdown  # the size against fp32
    root = ET.fromstring(svg.read_text(encoding="utf-8"))  # well-formed XML
    assert root.tag == f"{SVG}svg"
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "tiny <llama> int8 cpu" in texts
    assert ("PASSED" if report.passed else "FAILED") in texts
    rects = list(root.iter(f"{SVG}rect"))  # background, 2 panels, one bar per canary and bucket
    assert len(rects) == 3 + len(report.canaries) + len(report.top1_by_bucket)


# --- calibration and held-out text ---------------------------------------------------------------


def test_shipped_calibration_samples(codec: TextCodec) -> None:
    samples = load_text_samples(None, codec)
    assert len(samples) == 64
    assert all(len(s) == 128 for s in samples)
    assert len({tuple(s) for s in samples}) == 64
    special = {codec.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert not special & {t for s in samples for t in s}


def test_heldout_is_enough_text_and_never_calibration(codec: TextCodec) -> None:
    samples = heldout_samples(codec)
    assert len(samples) == 16
    assert all(len(s) == 256 for s in samples)
    calibration = set(split_passages((DATA / CALIBRATION_FILE).read_text(encoding="utf-8")))
    heldout = set(split_passages((DATA / HELDOUT_FILE).read_text(encoding="utf-8")))
    assert len(heldout) >= 40
    assert len(calibration) >= 100
    assert not calibration & heldout


def test_user_calibration_file(codec: TextCodec, tmp_path: Path) -> None:
    path = tmp_path / "domain.txt"
    passages = [f"Pump P-{n} was inspected; the seal leaked {n} drops a minute." for n in range(90)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(passages).encode("utf-8"))  # with a BOM
    samples = load_text_samples(path, codec, seq_len=32, max_samples=10)
    assert len(samples) == 10
    assert all(len(s) == 32 for s in samples)
    text = codec.tokenizer.decode(samples[0])
    assert text.startswith("Pump P-0 was inspected")
    assert "\ufeff" not in text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\n  \n\t\n", "is empty"),
        (b"caf\xe9 au lait, " * 200, "not UTF-8"),
        (b"A short note about a pump.", "too short"),
    ],
)
def test_bad_calibration_files(
    codec: TextCodec, tmp_path: Path, content: bytes | None, match: str
) -> None:
    path = tmp_path / "calibration.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BuildError, match=match) as caught:
        load_text_samples(path, codec)
    assert caught.value.code == "bad_calibration"
    assert str(path) in caught.value.message


def test_calibration_path_is_a_directory(codec: TextCodec, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="is a directory"):
        load_text_samples(tmp_path, codec)
