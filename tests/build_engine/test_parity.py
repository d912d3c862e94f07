"""ONNX export of the tiny model, and the PyTorch-vs-ONNX Runtime parity gate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from build_engine.errors import BuildError
from build_engine.model_source import load_model, resolve_model
from build_engine.onnx_export import DATA_NAME, ONNX_NAME, ExportResult, export_onnx
from build_engine.parity import ParityReport, PromptParity, StepParity, check_parity
from tests.build_engine.conftest import MakeModelDir

PROMPTS = ["Hello, my name is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"]


def test_export_writes_exactly_the_graph_files(tiny_export: ExportResult) -> None:
    out = tiny_export.onnx_path.parent
    assert sorted(p.name for p in out.iterdir()) == [ONNX_NAME, DATA_NAME]
    assert list(out.parent.iterdir()) == [out]  # the scratch directory is gone
    assert tiny_export.files == (out / ONNX_NAME, out / DATA_NAME)


def test_export_interface(tiny_export: ExportResult, tiny_dims: dict[str, int]) -> None:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    layers = range(tiny_dims["layers"])
    kv = [f"past_key_values.{i}.{s}" for i in layers for s in ("key", "value")]
    present = [f"present.{i}.{s}" for i in layers for s in ("key", "value")]
    assert tiny_export.input_names == ("input_ids", "attention_mask", "position_ids", *kv)
    assert tiny_export.output_names == ("logits", *present)
    assert tiny_export.arch() == {**tiny_dims, "max_seq_len": 512}
    assert tiny_export.kv_dtype == "float32"
    assert tiny_export.opset >= 17
    assert tiny_export.tied_embeddings_deduplicated

    graph = onnx.load(str(tiny_export.onnx_path), load_external_data=False)
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.graph.input, *graph.graph.output]
    }
    kv_heads, head_dim, vocab = tiny_dims["kv_heads"], tiny_dims["head_dim"], tiny_dims["vocab"]
    assert shapes["past_key_values.0.key"] == [
        "batch_size",
        kv_heads,
        "past_sequence_length",
        head_dim,
    ]
    assert shapes["present.1.value"] == [
        "batch_size",
        kv_heads,
        "past_sequence_length + sequence_length",
        head_dim,
    ]
    assert shapes["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert shapes["logits"] == ["batch_size", "sequence_length", vocab]
    external = [t for t in graph.graph.initializer if uses_external_data(t)]
    assert external and {ExternalDataInfo(t).location for t in external} == {DATA_NAME}
    # The tied table is stored once: only the embedding has a vocab-sized initializer.
    assert sum(vocab in t.dims for t in graph.graph.initializer) == 1


def test_untied_model_keeps_both_tables(
    tmp_path: Path,
    make_model_dir: MakeModelDir,
    tiny_dims: dict[str, int],
) -> None:
    import onnx

    source = resolve_model(str(make_model_dir(tmp_path / "src", {"tie_word_embeddings": False})))
    model, tokenizer = load_model(source)
    result = export_onnx(model, tokenizer, tmp_path / "out", progress=lambda _m: None)
    assert not result.tied_embeddings_deduplicated
    graph = onnx.load(str(result.onnx_path), load_external_data=False)
    assert sum(tiny_dims["vocab"] in t.dims for t in graph.graph.initializer) == 2
    check_parity(model, tokenizer, result.onnx_path, PROMPTS[:1], new_tokens=3).raise_if_failed()


def test_export_reports_its_phases(tmp_path: Path, tiny_model: tuple[Any, Any]) -> None:
    seen: list[str] = []
    model, tokenizer = tiny_model
    export_onnx(model, tokenizer, tmp_path / "out", progress=seen.append)
    assert len(seen) >= 3 and all(isinstance(s, str) and s for s in seen)
    assert any("tracing" in s for s in seen) and any("saving" in s for s in seen)


def test_export_refuses_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)  # type: ignore[no-untyped-call]
    model = GPT2LMHeadModel(config)  # type: ignore[no-untyped-call]
    with pytest.raises(BuildError) as info:
        export_onnx(model, None, tmp_path / "out", progress=lambda _m: None)  # type: ignore[arg-type]
    assert info.value.code == "unsupported_architecture"


def test_parity_ok_on_tiny_model(tiny_model: tuple[Any, Any], tiny_export: ExportResult) -> None:
    model, tokenizer = tiny_model
    report = check_parity(model, tokenizer, tiny_export.onnx_path, PROMPTS)
    report.raise_if_failed()
    assert report.ok
    assert len(report.prompts) == len(PROMPTS)
    for p in report.prompts:
        assert len(p.steps) == 8 and p.steps[0].step == 0
        assert all(s.torch_token == s.onnx_token for s in p.steps)
    # Measured ~3e-7 here; the default tolerance (~1.4e-4 for these logits) is far above.
    assert report.max_abs_diff < 1e-5
    assert report.to_dict()["ok"] is True


def _corrupt_copy(src: ExportResult, dst: Path) -> Path:
    """A copy of the export with its vocab table (embedding + lm_head) scaled: a damaged graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(src.onnx_path))  # tiny: fine to load the weights
    tensor = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.5, tensor.name))
    dst.mkdir()
    onnx.save(graph, str(dst / ONNX_NAME), save_as_external_data=True, location=DATA_NAME)
    return dst / ONNX_NAME


def test_parity_fails_on_a_corrupted_graph(
    tmp_path: Path, tiny_model: tuple[Any, Any], tiny_export: ExportResult
) -> None:
    model, tokenizer = tiny_model
    broken = _corrupt_copy(tiny_export, tmp_path / "broken")
    report = check_parity(model, tokenizer, broken, PROMPTS[:1], new_tokens=2)
    assert not report.ok
    assert report.max_abs_diff > 100 * report.prompts[0].steps[0].tolerance
    with pytest.raises(BuildError) as info:
        report.raise_if_failed()
    assert info.value.code == "parity_failed"
    assert repr(PROMPTS[0]) in info.value.message
    assert "prefill" in info.value.message and "tolerance" in info.value.message


def test_parity_refuses_a_graph_ort_cannot_load(
    tmp_path: Path, tiny_model: tuple[Any, Any], tiny_export: ExportResult
) -> None:
    model, tokenizer = tiny_model
    shutil.copy(tiny_export.onnx_path, tmp_path / ONNX_NAME)  # weights file missing
    with pytest.raises(BuildError) as info:
        check_parity(model, tokenizer, tmp_path / ONNX_NAME, PROMPTS[:1])
    assert info.value.code == "parity_failed"


def test_token_mismatch_message_names_prompt_and_step() -> None:
    bad = StepParity(
        step=3, max_abs_diff=1e-6, tolerance=1e-4, torch_token=5, onnx_token=7, tokens_agree=False
    )
    good = StepParity(
        step=0, max_abs_diff=1e-6, tolerance=1e-4, torch_token=5, onnx_token=5, tokens_agree=True
    )
    report = ParityReport(
        prompts=(PromptParity(prompt="abc", prompt_tokens=2, steps=(good, bad)),),
        atol=1e-4,
        rtol=1e-4,
    )
    assert not report.ok
    with pytest.raises(BuildError, match=r"'abc' at decode step 3: greedy token differs"):
        report.raise_if_failed()
