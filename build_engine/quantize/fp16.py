"""A strongly typed fp16 graph with fp32 islands where fp16 is not accurate enough (`to_fp16`).

Strongly typed TensorRT honours exactly the types the graph states, so the graph itself must say
which tensors stay fp32. The modes come from data flow, not from node names:

- a float tensor is an *activation* when it depends on a float graph input (the KV cache) or
  a weight of rank >= 2 (embedding, projections); everything else (RoPE angles from position
  ids, the causal mask, shape arithmetic, scalar constants) is *static*;
- activation nodes run in fp16, static nodes stay fp32 (the RoPE angle `position * inv_freq`
  loses whole radians in fp16 beyond position ~2000), and the islands below are forced fp32;
- where a tensor meets a node of the other mode an explicit Cast is inserted; constants get a
  converted copy instead (clipped to +-65504, so finfo(float32).min masks stay finite).

Islands: RMSNorm's `Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div/Reciprocal -> Mul(x, .)`
(x**2 overflows fp16 once |x| > 256, and residual streams do reach that), and each Softmax
together with the mask Add in front of it (adding a -3.4e38 mask in fp16 gives -inf rows).
Logits stay fp32 (one Cast after lm_head), so every backend reads the same output type and the
sampling code never sees fp16 rounding of close logits.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engine.errors import BuildError
from build_engine.quantize.common import consumers

if TYPE_CHECKING:
    import onnx

# onnx.TensorProto element types (onnx itself is imported only where a graph is touched).
_FLOAT = 1
_FLOAT16 = 10
_FP16_MAX = 65504.0
# Ops whose output describes a tensor's shape, not its values: they end the activation flow.
_METADATA_OPS = ("Shape", "Size")
# (op, input position) that read any float type: no Cast is needed in front of them.
_TYPE_AGNOSTIC = {("Cast", 0), ("Shape", 0), ("Size", 0), ("IsNaN", 0), ("IsInf", 0)}
# Tensors at most this big keep their bytes in the weight-free copies used for type inference.
_INFERENCE_BYTES = 1024


def to_fp16(model: onnx.ModelProto) -> dict[str, Any]:
    """Rewrite `model` in place so every float tensor is fp16 except the numerically sensitive ones
    (see the module docstring); return the statistics recorded in the manifest."""
    graph = model.graph
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        raise BuildError("quantize_failed", "fp16 conversion cannot handle control-flow subgraphs")
    tensors = _Tensors.of(model)
    active = _activation_tensors(graph, tensors)
    keep = _rmsnorm_islands(graph) | _softmax_islands(graph, active)
    rewrite = _Fp16Rewrite(tensors, _fp16_nodes(graph, tensors, active, keep))
    rewrite.mark_fp16_tensors(graph)
    rewrite.convert_constants(graph)
    rewrite.insert_casts(graph)
    rewrite.retype_outputs(graph)
    graph.ClearField("node")
    graph.node.extend(rewrite.nodes)
    del graph.value_info[:]
    _check_types(model)
    stats = {
        "casts_inserted": rewrite.casts_inserted,
        "fp32_island_nodes": len(keep),
        "fp16_initializers": rewrite.converted_initializers,
        "fp32_initializers": sum(1 for t in graph.initializer if t.data_type == _FLOAT),
    }
    return {"fp16": stats, "logits": "float32", "kv_cache": "float16"}


@dataclass(frozen=True)
class _Tensors:
    """Every tensor's element type, and the constant ones (initializers, Constant nodes) by name."""

    types: dict[str, int]
    inits: dict[str, onnx.TensorProto]
    consts: dict[str, onnx.NodeProto]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Tensors:
        consts = {
            n.output[0]: n
            for n in model.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        inits = {t.name: t for t in model.graph.initializer}
        return cls(_tensor_types(model), inits, consts)

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == _FLOAT

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def value(self, name: str) -> onnx.TensorProto:
        """A constant's tensor: the initializer, or the Constant node's `value`."""
        return self.inits[name] if name in self.inits else self.consts[name].attribute[0].t


def _activation_tensors(graph: onnx.GraphProto, tensors: _Tensors) -> set[str]:
    """Float graph inputs and rank >= 2 initializers of any type (int8/int4 weights behind a
    DequantizeLinear count too), and all that is computed from them except shape metadata."""
    active = {i.name for i in graph.input if tensors.is_float(i.name)}
    active |= {t.name for t in graph.initializer if len(t.dims) >= 2}
    for node in graph.node:  # topological order: one pass reaches everything downstream
        if node.op_type not in _METADATA_OPS and any(i in active for i in node.input):
            active.update(node.output)
    return active


def _fp16_nodes(
    graph: onnx.GraphProto, tensors: _Tensors, active: set[str], keep: set[str]
) -> set[int]:
    """Indices of the nodes that run fp16: float activation nodes outside the fp32 islands."""
    chosen: set[int] = set()
    for idx, node in enumerate(graph.node):
        if node.op_type == "Constant" or node.name in keep or node.op_type in _METADATA_OPS:
            continue
        touches_float = any(tensors.is_float(t) for t in (*node.input, *node.output) if t)
        if touches_float and any(i in active for i in node.input):
            chosen.add(idx)
    return chosen


def _fp16_array(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    clipped: np.ndarray[Any, Any] = np.clip(values, -_FP16_MAX, _FP16_MAX)
    return clipped.astype(np.float16)


def _to_half(tensor: onnx.TensorProto, name: str) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(_fp16_array(numpy_helper.to_array(tensor)), name))


class _Fp16Rewrite:
    """The new node list, built where the two modes meet: Casts, converted constants and copies.

    `new_type` holds the float tensors that end up fp16; any other float tensor stays fp32.
    """

    def __init__(self, tensors: _Tensors, fp16_nodes: set[int]) -> None:
        self._tensors = tensors
        self._fp16_nodes = fp16_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.new_type: dict[str, int] = {}
        self.casts_inserted = 0
        self.converted_initializers = 0
        self._casts: dict[tuple[str, int], str] = {}
        self._const_copies: dict[tuple[str, int], str] = {}

    def _mode(self, idx: int) -> int:
        return _FLOAT16 if idx in self._fp16_nodes else _FLOAT

    def mark_fp16_tensors(self, graph: onnx.GraphProto) -> None:
        """fp16 nodes' float outputs and every float graph input (the KV cache) become fp16."""
        for idx, node in enumerate(graph.node):
            if idx in self._fp16_nodes:
                self.new_type.update(
                    {o: _FLOAT16 for o in node.output if self._tensors.is_float(o)}
                )
        for inp in graph.input:
            if self._tensors.is_float(inp.name):
                self.new_type[inp.name] = _FLOAT16
                inp.type.tensor_type.elem_type = _FLOAT16

    def convert_constants(self, graph: onnx.GraphProto) -> None:
        """Constants whose every float reader is fp16 are converted in place; the rest get copies
        (made on demand by `insert_casts`)."""
        wants: dict[str, set[int]] = defaultdict(set)
        for idx, node in enumerate(graph.node):
            for pos, name in enumerate(node.input):
                constant = self._tensors.is_constant(name) and self._tensors.is_float(name)
                if constant and (node.op_type, pos) not in _TYPE_AGNOSTIC:
                    wants[name].add(self._mode(idx))
        for name in (n for n, w in wants.items() if w == {_FLOAT16}):
            _to_half(self._tensors.value(name), name)
            if name in self._tensors.inits:
                self.converted_initializers += 1
            self.new_type[name] = _FLOAT16

    def insert_casts(self, graph: onnx.GraphProto) -> None:
        """Every node, its float inputs in its own mode; Cast and ConstantOfShape retargeted."""
        for idx, node in enumerate(graph.node):
            if node.op_type == "Constant":
                self.nodes.append(node)
                continue
            want = self._mode(idx)
            for pos, name in enumerate(node.input):
                if (
                    name
                    and self._tensors.is_float(name)
                    and (node.op_type, pos) not in _TYPE_AGNOSTIC
                ):
                    node.input[pos] = self._typed(name, want)
            if node.op_type == "Cast":
                for attr in node.attribute:
                    if attr.name == "to" and attr.i == _FLOAT:
                        attr.i = want
            elif node.op_type == "ConstantOfShape" and want == _FLOAT16:
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == _FLOAT:
                        _to_half(attr.t, attr.t.name)
            self.nodes.append(node)

    def retype_outputs(self, graph: onnx.GraphProto) -> None:
        """KV presents become fp16; logits stay fp32 behind one Cast."""
        from onnx import helper

        for out in graph.output:
            if not self._tensors.is_float(out.name):
                continue
            if out.name == "logits":
                if self.new_type.get("logits") == _FLOAT16:
                    producer = next(n for n in self.nodes if "logits" in n.output)
                    producer.output[list(producer.output).index("logits")] = "logits_fp16"
                    cast = helper.make_node(
                        "Cast", ["logits_fp16"], ["logits"], name="logits_to_fp32", to=_FLOAT
                    )
                    self.nodes.append(cast)
            elif self.new_type.get(out.name) == _FLOAT16:
                out.type.tensor_type.elem_type = _FLOAT16

    def _typed(self, name: str, want: int) -> str:
        """`name` as type `want`: itself, a constant's converted copy, or a Cast's output."""
        if self.new_type.get(name, _FLOAT) == want:
            return name
        if self._tensors.is_constant(name):
            return self._const_copy(name, want)
        key = (name, want)
        if key not in self._casts:
            from onnx import helper

            out = f"{name}__to_{'fp16' if want == _FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [out], name=out, to=want))
            self._casts[key] = out
            self.casts_inserted += 1
        return self._casts[key]

    def _const_copy(self, name: str, want: int) -> str:
        key = (name, want)
        if key not in self._const_copies:
            from onnx import helper, numpy_helper

            values = numpy_helper.to_array(self._tensors.value(name))
            copy_name = f"{name}__fp16"
            array = _fp16_array(values) if want == _FLOAT16 else values
            self.nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [copy_name],
                    name=f"{copy_name}_const",
                    value=numpy_helper.from_array(array, copy_name),
                )
            )
            self._const_copies[key] = copy_name
        return self._const_copies[key]


def _weight_free_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without the bytes of initializers over `_INFERENCE_BYTES`: inference needs only
    the types, and the small shape-carrying tensors (kept) for the shapes."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) > _INFERENCE_BYTES:
            tensor.ClearField("raw_data")
    return light


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX shape inference on a weight-free copy."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_weight_free_copy(model))
    types: dict[str, int] = {}
    for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        types[info.name] = info.type.tensor_type.elem_type
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _check_types(model: onnx.ModelProto) -> None:
    """Strict type inference on a weight-free copy: a mixed-type node fails the build here."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(
            _weight_free_copy(model), check_type=True, strict_mode=True
        )
    except Exception as e:  # onnx raises InferenceError and plain RuntimeErrors
        raise BuildError("quantize_failed", f"fp16 conversion left a type mismatch: {e}") from e


def _rmsnorm_islands(graph: onnx.GraphProto) -> set[str]:
    """Node names of each `x*x -> mean -> +eps -> sqrt -> 1/. -> x*.` chain (RMSNorm's variance)."""
    users = consumers(graph)

    def only(name: str, *ops: str) -> onnx.NodeProto | None:
        found = [n for n in users.get(name, []) if n.op_type in ops]
        return found[0] if len(found) == 1 else None

    keep: set[str] = set()
    for node in graph.node:
        if node.op_type != "Pow":
            continue
        x = node.input[0]
        chain = [node]
        mean = only(node.output[0], "ReduceMean")
        add = mean and only(mean.output[0], "Add")
        sqrt = add and only(add.output[0], "Sqrt")
        inv = sqrt and only(sqrt.output[0], "Div", "Reciprocal")
        if not (mean and add and sqrt and inv):
            keep.update(n.name for n in chain)  # at least x**2 stays fp32
            continue
        chain += [mean, add, sqrt, inv]
        scale = next(
            (n for n in users.get(inv.output[0], []) if n.op_type == "Mul" and x in n.input), None
        )
        if scale is not None:
            chain.append(scale)
        keep.update(n.name for n in chain)
    return keep


def _softmax_islands(graph: onnx.GraphProto, active: set[str]) -> set[str]:
    """Each Softmax, plus the Add in front of it when that Add brings in a static (mask) tensor."""
    producers = {o: n for n in graph.node for o in n.output}
    keep: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Softmax", "LogSoftmax"):
            continue
        keep.add(node.name)
        add = producers.get(node.input[0])
        if add is not None and add.op_type == "Add" and any(i not in active for i in add.input):
            keep.add(add.name)
    return keep
