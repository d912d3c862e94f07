"""Linear layers reading the same input are merged into one MatMul + Split with the same
results; a weight that something else also reads is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from build_engine.quantize.fuse_linear import fuse_parallel_matmuls


def _qkv_and_shared_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shapes = {"wq": (8, 8), "wk": (8, 4), "wv": (8, 4), "table": (8, 16)}
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("MatMul", ["x", "table"], ["logits"], name="lm_head"),
        helper.make_node("Gather", ["table", "ids"], ["looked_up"], axis=1),  # shares `table`
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
         for o in ("q", "k", "v", "logits", "looked_up")],
        initializer=[numpy_helper.from_array(a, n) for n, a in w.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    return [np.asarray(o) for o in session.run(None, {"x": x, "ids": np.array([0, 5])})]


def test_q_k_v_become_one_matmul_with_the_same_outputs() -> None:
    model = _qkv_and_shared_head()
    expected = _run(model)

    assert fuse_parallel_matmuls(model) == 2

    ops = sorted(n.op_type for n in model.graph.node)
    assert ops == ["Gather", "MatMul", "MatMul", "Split"], ops  # q|k|v fused, lm_head kept
    fused = next(t for t in model.graph.initializer if t.name.endswith("_fused.weight"))
    assert list(fused.dims) == [8, 16]
    for got, want in zip(_run(model), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
