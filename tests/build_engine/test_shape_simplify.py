"""The exported graph's run-time shape arithmetic is replaced by constant shapes, with the same
results: on a hand-made `view` + `repeat_kv` graph, and on the tiny Llama's export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from build_engine.onnx_export import ExportResult
from build_engine.shape_simplify import simplify_shapes


def _view_and_repeat_kv() -> onnx.ModelProto:
    """x [batch, seq, 6] -> view [batch, seq, 3, 2] (shape read at run time, as torch exports
    it) -> unsqueeze + expand x2 (repeat_kv) -> [batch, seq, 3, 2, 2]."""
    ints = {name: numpy_helper.from_array(np.array(v, np.int64), name)
            for name, v in {"zero": [0], "one": [1], "tail": [3, 2],
                            "axis3": [3], "two": [1, 1, 1, 2, 1]}.items()}  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"]),
        helper.make_node("Gather", ["shape", "one"], ["s"]),
        helper.make_node("Concat", ["b", "s", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["viewed"]),
        helper.make_node("Unsqueeze", ["viewed", "axis3"], ["unsqueezed"]),
        helper.make_node("Shape", ["unsqueezed"], ["u_shape"]),
        helper.make_node("Mul", ["u_shape", "two"], ["grown"]),
        helper.make_node("Expand", ["unsqueezed", "grown"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=list(ints.values()),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_run_time_shapes_become_constants_with_the_same_result() -> None:
    model = _view_and_repeat_kv()
    x = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
    expected = _run(model, x)

    removed = simplify_shapes(model)

    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Reshape", "Unsqueeze", "Expand"], ops  # Shape/Gather/Concat/Mul are gone
    assert removed == 6
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    assert constants[model.graph.node[0].input[1]] == [0, 0, 3, 2]
    assert constants[model.graph.node[2].input[1]] == [1, 1, 1, 2, 1]
    np.testing.assert_array_equal(_run(model, x), expected)
    np.testing.assert_array_equal(
        _run(model, x[:1, :2]), _run(_view_and_repeat_kv(), x[:1, :2])
    )  # other run-time sizes too


def test_no_layer_of_the_tiny_llama_export_computes_shapes(tiny_export: ExportResult) -> None:
    """Per layer, every Reshape/Expand target is a constant (two model-level ones, run once per
    step, depend on the batch size and stay)."""
    model = onnx.load(str(tiny_export.onnx_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    dynamic = [
        n.name
        for n in model.graph.node
        if n.op_type in ("Reshape", "Expand")
        and n.input[1] not in constants
        and "/layers." in n.name
    ]
    assert dynamic == [], dynamic
