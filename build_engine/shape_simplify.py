"""Replace the exported graph's run-time shape arithmetic with constant shapes where the shapes
are known symbolically.

The TorchScript export writes every `view`/`reshape`/`expand` of a decoder layer as a small graph
that reads the shape of a tensor at run time: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`,
plus `Equal`/`Where`/`Mul` for `repeat_kv`'s expand. On SmolLM2-135M that is ~40 of a layer's 73
nodes after ONNX Runtime's own optimizations, 1,200 tiny kernels per generated token whose cost is
launch overhead, not arithmetic: once the MatMuls are int4, they are a large share of a decode
step. Symbolic shape inference (ONNX Runtime's `SymbolicShapeInference`) tells us that, say, a
`Reshape` maps `[batch, seq, 192]` to `[batch, seq, 3, 64]`: its shape input becomes the constant
`[0, 0, 3, 64]` (0 = keep that input dimension), and an `Expand` of `[batch, 3, 1, L, 64]` to
`[batch, 3, 3, L, 64]` becomes a broadcast by the constant `[1, 1, 3, 1, 1]`. The arithmetic that
fed them is then unused and removed. Nothing else changes; the parity check against PyTorch that
follows the export proves the result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

Dim = int | str  # a known size, or a symbolic expression such as "batch_size"


def simplify_shapes(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place; return how many nodes were removed. Weights are not touched
    (external data is never read)."""
    if any(a.g.node or a.graphs for n in model.graph.node for a in n.attribute):
        return 0  # subgraphs (If/Loop) can read outer names: out of this pass's scope
    shapes = _symbolic_shapes(model)
    if shapes is None:
        return 0
    before = len(model.graph.node)
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    for node in model.graph.node:
        if node.op_type == "Reshape" and not _allows_zero(node):
            new = _reshape_target(shapes.get(node.input[0]), shapes.get(node.output[0]))
        elif node.op_type == "Expand":
            new = _expand_target(shapes.get(node.input[0]), shapes.get(node.output[0]))
        else:
            continue
        if new is not None and node.input[1] not in constants:
            node.input[1] = _add_shape_constant(model, f"{node.output[0]}_static_shape", new)
    remove_unused_nodes(model)
    return before - len(model.graph.node)


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[Dim]] | None:
    """Every tensor's shape, with symbolic dims, from a copy whose external weights are declared
    as graph inputs (so inference never reads their bytes)."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    external = [t for t in probe.graph.initializer if uses_external_data(t)]
    for tensor in external:
        probe.graph.initializer.remove(tensor)
        probe.graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    try:
        inferred = SymbolicShapeInference.infer_shapes(probe, auto_merge=True)
    except Exception as exc:  # a graph it cannot follow is left as it is, never broken
        log.warning("symbolic shape inference failed (%s); shapes left dynamic", exc)
        return None
    shapes: dict[str, list[Dim]] = {}
    graph = inferred.graph
    for info in [*graph.value_info, *graph.input, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor_type.shape.dim
        ]
    return shapes


def _known(shape: list[Dim] | None) -> bool:
    return shape is not None and all(d != "?" and d != "" for d in shape)


def _reshape_target(src: list[Dim] | None, dst: list[Dim] | None) -> list[int] | None:
    """Constant Reshape target: fixed sizes, 0 where the dim is the input's own at that
    position, and at most one -1."""
    if src is None or dst is None or not _known(src) or not _known(dst):
        return None
    target: list[int] = []
    for position, dim in enumerate(dst):
        if isinstance(dim, int):
            target.append(dim)
        elif position < len(src) and src[position] == dim:
            target.append(0)
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def _expand_target(src: list[Dim] | None, dst: list[Dim] | None) -> list[int] | None:
    """Constant Expand shape: 1 where the dim is kept, the size where a 1 is broadcast to a
    fixed size; None when a 1 would have to grow to a run-time size."""
    if src is None or dst is None or not _known(src) or not _known(dst) or len(src) != len(dst):
        return None
    target: list[int] = []
    for have, want in zip(src, dst, strict=True):
        if have == want:
            target.append(1)
        elif have == 1 and isinstance(want, int):
            target.append(want)
        else:
            return None
    return target


def _allows_zero(node: onnx.NodeProto) -> bool:
    return any(a.name == "allowzero" and a.i == 1 for a in node.attribute)


def _add_shape_constant(model: onnx.ModelProto, name: str, values: list[int]) -> str:
    import numpy as np
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def remove_unused_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (repeatedly: removing one frees its inputs)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
