"""Merge linear layers that read the same input into one MatMul (q/k/v, and gate/up).

A decode step multiplies a single row by each weight matrix; at that size a `MatMulNBits` call
costs about as much in dispatch and thread hand-off as in arithmetic, and a decoder layer makes
seven of them. Concatenating the weights of the projections that share an input along the output
axis (q|k|v: 576 x 960 instead of three matrices on SmolLM2; gate|up) and splitting the result
leaves 4 calls per layer instead of 7. Quantization is per column (blocks run along the input
axis), so the quantized weights are exactly those of the separate layers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def fuse_parallel_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place; return how many MatMul nodes were merged away."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2 and readers[weight.name] == 1:
            groups[node.input[0]].append(node)  # a weight shared with another op stays put

    merged = 0
    for source, nodes in groups.items():
        inner = {int(weights[n.input[1]].dims[0]) for n in nodes}
        dtypes = {weights[n.input[1]].data_type for n in nodes}
        if len(nodes) < 2 or len(inner) != 1 or len(dtypes) != 1:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name or nodes[0].output[0]}_fused"
        fused = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}.weight")
        sizes = numpy_helper.from_array(
            np.array([a.shape[1] for a in arrays], np.int64), f"{name}.split"
        )
        at = min(list(graph.node).index(n) for n in nodes)
        replacement = [
            helper.make_node("MatMul", [source, fused.name], [f"{name}.out"], name=name),
            helper.make_node(
                "Split",
                [f"{name}.out", sizes.name],
                [n.output[0] for n in nodes],
                name=f"{name}.split",
                axis=-1,
            ),
        ]
        for node in nodes:
            graph.node.remove(node)
            graph.initializer.remove(weights[node.input[1]])
        for offset, node in enumerate(replacement):
            graph.node.insert(at + offset, node)
        graph.initializer.extend([fused, sizes])
        merged += len(nodes) - 1
    return merged
