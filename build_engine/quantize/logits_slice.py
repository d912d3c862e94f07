"""Compute the lm_head only for the positions a caller wants (the last one, when generating).

A prefill of S tokens needs one row of logits, yet the exported graph multiplies all S hidden
states by the [hidden, vocab] lm_head: for SmolLM2 (vocab 49,152) that is a fifth of a 156-token
prefill's arithmetic, thrown away. This pass puts a Slice on the sequence axis in front of the
lm_head, starting at the input `logits_start` (int64 [1]): the agent feeds [-1] (last position),
the accuracy gate's teacher forcing [0] (every position); the ONNX Runtime backend binds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

LOGITS_START_INPUT = "logits_start"


def slice_logits_input(model: onnx.ModelProto, lm_head: str) -> bool:
    """Rewrite `model` in place, a Slice in front of the MatMul named `lm_head`; False when the
    graph has no such node."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == LOGITS_START_INPUT for i in graph.input):
        return True
    matmul = next((n for n in graph.node if n.name == lm_head and n.op_type == "MatMul"), None)
    if matmul is None:
        return False
    hidden = matmul.input[0]
    sliced = f"{hidden}_from_logits_start"
    constants = {
        "logits_slice.end": np.array([np.iinfo(np.int64).max], np.int64),
        "logits_slice.axis": np.array([1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    graph.input.append(helper.make_tensor_value_info(LOGITS_START_INPUT, TensorProto.INT64, [1]))
    position = list(graph.node).index(matmul)
    graph.node.insert(
        position,
        helper.make_node(
            "Slice",
            [hidden, LOGITS_START_INPUT, "logits_slice.end", "logits_slice.axis"],
            [sliced],
            name="logits_slice",
        ),
    )
    matmul.input[0] = sliced
    return True
