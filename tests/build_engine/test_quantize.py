"""Quantization: every precision x target on the tiny random Llama export.

Structure is what these tests pin down (the accuracy of real weights is the accuracy gate's job):
each combination writes exactly model.onnx + model.onnx.data, orin graphs hold standard ONNX ops
only with Q/DQ where TensorRT expects them, cpu graphs use ONNX Runtime's MatMulNBits, and ONNX
Runtime's CPU provider runs every graph through a prefill and a decode step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from build_engine.onnx_export import ExportResult
from build_engine.quantize import QuantResult, contrib_ops, quantize
from build_engine.quantize.common import CalibrationFeeds, find_lm_head
from build_engine.quantize.int4_weights import INT4_BLOCK

COMBINATIONS = [(p, t) for t in ("cpu", "orin") for p in ("fp16", "int8", "int4")]

_TEXT = [
    "The harbour town woke slowly under a grey sky, and the fishing boats came back one by one.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "To reset the router, hold the button on the back panel for ten seconds.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The committee reviewed the quarterly budget and found that travel costs had risen.",
    "User: Why is the sky blue? Assistant: Blue light is scattered more by the air.",
    "Mix two cups of flour with salt, add warm water and knead the dough for ten minutes.",
    "SELECT id, SUM(amount) FROM orders GROUP BY id ORDER BY 2 DESC LIMIT 10;",
]


@pytest.fixture(scope="module")
def calibration(smollm2_tokenizer: Any) -> list[list[int]]:
    """Token sequences of 64+ tokens from varied English (the pipeline passes 64-256)."""
    ids: list[int] = []
    for sentence in _TEXT * 4:
        ids += smollm2_tokenizer(sentence + " ", add_special_tokens=False)["input_ids"]
    return [ids[i : i + 64] for i in range(0, len(ids) - 63, 64)][:6]


@pytest.fixture(scope="module")
def quantized(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_export: ExportResult,
    calibration: list[list[int]],
) -> dict[tuple[str, str], QuantResult]:
    results = {}
    for precision, target in COMBINATIONS:
        out = tmp_path_factory.mktemp(f"quant-{target}-{precision}") / "bundle"
        results[(precision, target)] = quantize(
            tiny_export.onnx_path,
            out,
            precision=precision,  # type: ignore[arg-type]
            target=target,  # type: ignore[arg-type]
            calibration=calibration,
            progress=lambda _msg: None,
        )
    return results


def _graph(result: QuantResult) -> onnx.ModelProto:
    return onnx.load(str(result.onnx_path), load_external_data=False)


@pytest.mark.parametrize(("precision", "target"), COMBINATIONS)
def test_writes_exactly_the_two_graph_files(
    quantized: dict[tuple[str, str], QuantResult], precision: str, target: str
) -> None:
    result = quantized[(precision, target)]
    assert sorted(p.name for p in result.onnx_path.parent.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
    ]
    assert not list(result.onnx_path.parent.parent.glob(".quantize-*")), "staging left behind"
    assert result.precision == precision and result.target == target
    assert result.method and result.seconds > 0
    assert result.details["seconds"] >= 0
    if target == "orin":
        # cpu graphs hold ONNX Runtime's SimplifiedLayerNormalization, which ORT registers in the
        # ONNX domain, so the onnx checker does not know it; ORT loads them (tested below).
        onnx.checker.check_model(str(result.onnx_path))


@pytest.mark.parametrize(("precision", "target"), COMBINATIONS)
def test_onnxruntime_cpu_runs_prefill_and_decode(
    quantized: dict[tuple[str, str], QuantResult],
    tiny_dims: dict[str, int],
    precision: str,
    target: str,
) -> None:
    backend = OnnxRuntimeBackend(
        quantized[(precision, target)].onnx_path,
        max_seq_len=64,
        providers=["CPUExecutionProvider"],
    )
    # cpu graphs keep the KV cache in buffers shared by past and present (GroupQueryAttention);
    # the orin graphs keep the past/present contract TensorRT's profiles are written for.
    assert backend.shared_kv == (target == "cpu")
    state = backend.new_state(1)
    prefill = backend.prefill(state, np.array([[1, 415, 2114, 314]]), all_positions=True)
    assert prefill.shape == (1, 4, tiny_dims["vocab"])
    assert prefill.dtype == np.float32
    assert np.isfinite(prefill).all()
    decode = backend.decode(state, np.array([29]))
    assert decode.shape == (1, tiny_dims["vocab"])
    assert np.isfinite(decode).all()
    assert state.length == 5


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_orin_graphs_hold_standard_ops_only(
    quantized: dict[tuple[str, str], QuantResult], precision: str
) -> None:
    assert contrib_ops(_graph(quantized[(precision, "orin")])) == []


def _q_dq(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    graph = model.graph
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in graph.initializer}
    # TensorRT wants symmetric quantization: every zero point is 0.
    for node in (*q_nodes, *dq_nodes):
        if len(node.input) > 2 and node.input[2] in inits:
            assert not onnx.numpy_helper.to_array(inits[node.input[2]]).any()
    return q_nodes, dq_nodes


def test_orin_int8_is_weight_only_int8(quantized: dict[tuple[str, str], QuantResult]) -> None:
    model = _graph(quantized[("int8", "orin")])
    inits = {t.name: t for t in model.graph.initializer}
    q_nodes, dq_nodes = _q_dq(model)
    assert not q_nodes
    assert dq_nodes and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in dq_nodes)
    head = find_lm_head(model)
    assert head.table is not None and inits[head.table].data_type == TensorProto.FLOAT


def test_orin_int8_details_state_only_what_this_build_did(
    quantized: dict[tuple[str, str], QuantResult],
) -> None:
    # The manifest records facts of this build; measurements of other models (W8A8 on SmolLM2)
    # live in build_engine/quantize/int8_weights.py's docstring.
    result = quantized[("int8", "orin")]
    model = _graph(result)
    dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert set(result.details) == {
        "int8_weight_matmuls", "activations", "excluded", "opset", "seconds"
    }  # fmt: skip
    assert result.details["int8_weight_matmuls"] == len(dq_nodes) > 0
    assert list(result.details["excluded"]) == [find_lm_head(model).matmul]


def test_orin_int4_is_blocked_weight_dq_without_lm_head(
    quantized: dict[tuple[str, str], QuantResult],
) -> None:
    model = _graph(quantized[("int4", "orin")])
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    for node in dq:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["block_size"] == INT4_BLOCK
        assert inits[node.input[0]].data_type == TensorProto.INT4
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear"]
    head = find_lm_head(model)
    assert head.table is not None and inits[head.table].data_type == TensorProto.FLOAT
    assert not any(head.weight in n.output for n in dq)


def test_orin_fp16_is_strongly_typed_with_fp32_islands(
    quantized: dict[tuple[str, str], QuantResult],
) -> None:
    model = _graph(quantized[("fp16", "orin")])
    graph = model.graph
    kv = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in kv)
    outputs = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    assert outputs["logits"] == TensorProto.FLOAT
    assert all(t == TensorProto.FLOAT16 for n, t in outputs.items() if n.startswith("present."))
    big = [t for t in graph.initializer if len(t.dims) >= 2]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in graph.node:
        if node.op_type in ("Pow", "ReduceMean", "Softmax", "Sqrt"):
            assert types[node.output[0]] == TensorProto.FLOAT, node.name


def test_cpu_graphs_use_matmulnbits(quantized: dict[tuple[str, str], QuantResult]) -> None:
    for precision, bits in (("int4", 4), ("int8", 8)):
        graph = _graph(quantized[(precision, "cpu")]).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits, precision
        assert all(
            helper.get_attribute_value(a) == bits
            for n in nbits
            for a in n.attribute
            if a.name == "bits"
        )
        assert any("lm_head" in n.name for n in nbits), "lm_head is quantized on cpu"
    fp16 = _graph(quantized[("fp16", "cpu")]).graph
    assert all(t.data_type != TensorProto.FLOAT for t in fp16.initializer if len(t.dims) >= 2)
    assert all(
        i.type.tensor_type.elem_type == TensorProto.FLOAT
        for i in fp16.input
        if i.name.startswith("past_")
    )


def test_contrib_ops_walks_subgraphs() -> None:
    inner = helper.make_graph(
        [helper.make_node("FusedMatMul", ["a", "a"], ["y"], domain="com.microsoft", name="fm")],
        "inner",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    outer = helper.make_graph(
        [
            helper.make_node(
                "If", ["c"], ["y"], name="branch", then_branch=inner, else_branch=inner
            ),
            helper.make_node("Relu", ["y"], ["z"], name="relu", domain="ai.onnx"),
        ],
        "outer",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    found = contrib_ops(helper.make_model(outer))
    assert found == ["com.microsoft::FusedMatMul (fm)"] * 2


def test_calibration_feeds_have_a_real_past(
    tiny_export: ExportResult, calibration: list[list[int]]
) -> None:
    feeds = list(CalibrationFeeds(tiny_export.onnx_path, calibration[:2]))
    assert len(feeds) == 4
    for feed in feeds:
        past = feed["past_key_values.0.key"]
        assert past.shape[2] > 0, "no sample with an empty past"
        total = past.shape[2] + feed["input_ids"].shape[1]
        assert feed["attention_mask"].shape == (1, total)
        assert feed["position_ids"][0, -1] == total - 1
    assert {f["input_ids"].shape[1] for f in feeds} >= {1}
    assert max(f["input_ids"].shape[1] for f in feeds) > 1


def test_rejects_unknown_precision(tiny_export: ExportResult, tmp_path: Path) -> None:
    from build_engine.errors import BuildError

    with pytest.raises(BuildError):
        quantize(
            tiny_export.onnx_path,
            tmp_path / "out",
            precision="int2",  # type: ignore[arg-type]
            target="cpu",
            calibration=[],
            progress=lambda _msg: None,
        )
