"""Attention onto ONNX Runtime's `GroupQueryAttention`, one KV buffer shared by past and present.

The exported graph follows optimum's past/present contract: every layer concatenates the whole
past KV cache with the new token's K/V into a fresh `present` tensor, every step (measured: 11% of
an int4 decode step at batch 1 and 4.2 of 19.8 ms at batch 8, the copy alone), and masks with a
left-padded attention mask. This pass replaces, per layer, the attention core (rotary, the two
Concats, QK^T, mask, softmax, xV and the reshapes around them) with one `GroupQueryAttention`
(com.microsoft) node:

- fed the packed q|k|v projection when `fuse_parallel_matmuls` merged it (no Split), with
  `do_rotary=1` on the cos/sin caches the RoPE fusion (`fuse_for_cpu`) already wrote;
- `past_key_values.{i}.*` and `present.{i}.*` become one preallocated buffer
  [batch, kv_heads, capacity, head_dim] that the backend binds as both input and output, so the
  kernel writes the new K/V in place and copies nothing;
- each row's length is its own (`seqlens_k` = tokens in the row's cache after this step, minus 1;
  `total_sequence_length` = the longest row): rows are right-aligned at position 0 with no padding,
  so a new job joins a running batch without left-padding anyone, and RoPE positions follow from
  the lengths (the `attention_mask` and `position_ids` inputs go away).

The pass matches the structure our export writes after `fuse_for_cpu` (RotaryEmbedding on q and k,
Concat with the past, grouped MatMul attention). If any layer does not match, nothing is changed
and the reason is returned: the graph then keeps the past/present contract, which the backend also
runs. The accuracy gate evaluates whichever graph is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from build_engine.quantize.common import consumers
from build_engine.shape_simplify import remove_unused_nodes

if TYPE_CHECKING:
    import onnx

SEQLENS_INPUT = "seqlens_k"  # [batch] int32: tokens in each row's cache after this step, minus 1
TOTAL_INPUT = "total_sequence_length"  # [] int32: the longest row after this step
CAPACITY_DIM = "kv_capacity"  # the shared buffer's sequence axis, chosen by the backend


def has_cpu_attention(onnx_path: Path) -> bool:
    """Whether the graph at `onnx_path` already runs attention on shared KV buffers (so it is a
    cpu graph: ONNX Runtime contrib operators that TensorRT cannot build)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(i.name == SEQLENS_INPUT for i in graph.input)


class NoMatch(Exception):
    """The graph is not the structure this pass rewrites (the message says where)."""


@dataclass
class _Layer:
    index: int
    query: str  # packed q|k|v [B, S, (Hq+2Hkv)*D], or q alone [B, S, Hq*D]
    key: str  # "" when packed
    value: str  # "" when packed
    output: str  # attention output [B, S, Hq*D], read by o_proj
    cos: str
    sin: str
    interleaved: int
    scale: float
    removed: list[onnx.NodeProto]


def use_group_query_attention(model: onnx.ModelProto) -> dict[str, Any]:
    """Rewrite `model` in place when every layer matches; return what was done (or why not)."""
    from onnx import TensorProto, helper

    graph = model.graph
    try:
        heads, kv_heads = _head_counts(model)
        layers = [_match_layer(model, i) for i in range(_layer_count(graph))]
    except NoMatch as exc:
        return {"applied": False, "reason": str(exc)}
    if not layers:
        return {"applied": False, "reason": "the graph has no past_key_values inputs"}

    before = len(graph.node)
    removed = {id(node) for layer in layers for node in layer.removed}
    kept = [node for node in graph.node if id(node) not in removed]
    for layer in layers:
        kept.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    layer.query,
                    layer.key,
                    layer.value,
                    f"past_key_values.{layer.index}.key",
                    f"past_key_values.{layer.index}.value",
                    SEQLENS_INPUT,
                    TOTAL_INPUT,
                    layer.cos,
                    layer.sin,
                ],
                [layer.output, f"present.{layer.index}.key", f"present.{layer.index}.value"],
                name=f"GroupQueryAttention_{layer.index}",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                scale=layer.scale,
                do_rotary=1,
                rotary_interleaved=layer.interleaved,
            )
        )
    try:
        ordered = _topological(kept, graph)
    except NoMatch as exc:
        return {"applied": False, "reason": str(exc)}
    graph.ClearField("node")
    graph.node.extend(ordered)
    remove_unused_nodes(model)

    used = {name for node in graph.node for name in node.input}
    for unused in [i for i in graph.input if i.name not in used]:
        graph.input.remove(unused)  # attention_mask, position_ids: the lengths carry both now
    graph.input.extend(
        [
            helper.make_tensor_value_info(SEQLENS_INPUT, TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info(TOTAL_INPUT, TensorProto.INT32, []),
        ]
    )
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = CAPACITY_DIM
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {
        "applied": True,
        "layers": len(layers),
        "packed_qkv": all(not layer.key for layer in layers),
        "before": before,
        "after": len(graph.node),
    }


def trim_rotary_tables(model: onnx.ModelProto, max_positions: int) -> int:
    """Cut the cos/sin tables the attention reads to `max_positions` rows; return the rows kept.

    ONNX Runtime's RoPE fusion writes them for 131,072 positions whatever the model's context
    (SmolLM2: 8,192): 33 MB of a 237 MB int4 bundle that no position can ever reach."""
    from onnx import numpy_helper

    tables = {
        name
        for node in model.graph.node
        if node.op_type == "GroupQueryAttention"
        for name in node.input[7:9]
    }
    kept = 0
    for tensor in model.graph.initializer:
        if tensor.name in tables and tensor.dims[0] > max_positions:
            rows = numpy_helper.to_array(tensor)[:max_positions]
            tensor.CopyFrom(numpy_helper.from_array(rows, tensor.name))
        if tensor.name in tables:
            kept = int(tensor.dims[0])
    return kept


def _layer_count(graph: onnx.GraphProto) -> int:
    return sum(1 for i in graph.input if i.name.startswith("past_key_values.")) // 2


def _head_counts(model: onnx.ModelProto) -> tuple[int, int]:
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values.")), None)
    if past is None:
        raise NoMatch("the graph has no past_key_values inputs")
    dims = past.type.tensor_type.shape.dim
    kv_heads, head_dim = dims[1].dim_value, dims[3].dim_value
    rotary = next((n for n in model.graph.node if n.op_type == "RotaryEmbedding"), None)
    if not kv_heads or not head_dim or rotary is None:
        raise NoMatch("no fused RotaryEmbedding or no static KV heads/head size")
    reshape = _producer(model.graph, rotary.input[0], "Transpose")
    target = _constant(model.graph, _producer(model.graph, reshape.input[0], "Reshape").input[1])
    if target is None or len(target) != 4:
        raise NoMatch("the query heads are not a constant reshape")
    return int(target[2]), int(kv_heads)


def _match_layer(model: onnx.ModelProto, index: int) -> _Layer:
    graph = model.graph
    readers = consumers(graph)
    past_k, past_v = f"past_key_values.{index}.key", f"past_key_values.{index}.value"
    k_concat = _only(readers[past_k], "Concat", past_k)
    v_concat = _only(readers[past_v], "Concat", past_v)
    if list(k_concat.output) != [f"present.{index}.key"] or list(v_concat.output) != [
        f"present.{index}.value"
    ]:
        raise NoMatch(f"layer {index}: the past Concats do not write present.{index}.*")
    k_rotary = _producer(graph, k_concat.input[1], "RotaryEmbedding")
    k_linear = _head_split_input(graph, k_rotary.input[0])
    v_linear = _head_split_input(graph, v_concat.input[1])

    transposed = [t for t in readers[k_concat.output[0]] if t.op_type == "Transpose"]
    scores = _only(
        [r for t in transposed for r in readers[t.output[0]]], "MatMul", f"layer {index} scores"
    )
    q_group = _producer(graph, scores.input[0], "Reshape")
    q_rotary = _producer(graph, q_group.input[0], "RotaryEmbedding")
    q_linear = _head_split_input(graph, q_rotary.input[0])
    for rotary in (q_rotary, k_rotary):
        attrs = {a.name: a for a in rotary.attribute}
        if set(attrs) - {"interleaved"}:
            raise NoMatch(f"layer {index}: RotaryEmbedding with {sorted(attrs)}")
    if q_rotary.input[2:] != k_rotary.input[2:]:
        raise NoMatch(f"layer {index}: q and k use different rotary caches")

    scaled = _only(readers[scores.output[0]], "Mul", f"layer {index} scale")
    scale = _constant(graph, scaled.input[1])
    if scale is None or len(scale) != 1:
        raise NoMatch(f"layer {index}: the attention scale is not a constant")
    weighted = _only(
        [r for r in readers[v_concat.output[0]] if r.op_type == "MatMul"], "MatMul", "xV"
    )
    chain = [weighted]
    output = weighted.output[0]
    while True:  # Reshape/Transpose back to [B, S, Hq*D], up to o_proj's MatMul
        nxt = readers[output]
        if len(nxt) != 1 or nxt[0].op_type not in ("Reshape", "Transpose"):
            break
        chain.append(nxt[0])
        output = nxt[0].output[0]

    split = _producer_or_none(graph, q_linear)
    packed = (
        split is not None
        and split.op_type == "Split"
        and list(split.output) == [q_linear, k_linear, v_linear]
    )
    interleaved = next((int(a.i) for a in q_rotary.attribute if a.name == "interleaved"), 0)
    return _Layer(
        index=index,
        query=split.input[0] if packed and split is not None else q_linear,
        key="" if packed else k_linear,
        value="" if packed else v_linear,
        output=output,
        cos=q_rotary.input[2],
        sin=q_rotary.input[3],
        interleaved=interleaved,
        scale=float(scale[0]),
        removed=[k_concat, v_concat, *chain],
    )


def _head_split_input(graph: onnx.GraphProto, name: str) -> str:
    """The [B, S, H*D] tensor behind Transpose(Reshape(x -> [B, S, H, D]), [0, 2, 1, 3])."""
    transpose = _producer(graph, name, "Transpose")
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    if perm != [0, 2, 1, 3]:
        raise NoMatch(f"{transpose.name}: perm {perm}, expected [0, 2, 1, 3]")
    return str(_producer(graph, transpose.input[0], "Reshape").input[0])


def _producer_or_none(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if name in n.output), None)


def _producer(graph: onnx.GraphProto, name: str, op_type: str) -> onnx.NodeProto:
    node = _producer_or_none(graph, name)
    if node is None or node.op_type != op_type:
        found = node.op_type if node is not None else "a graph input"
        raise NoMatch(f"{name} comes from {found}, expected {op_type}")
    return node


def _only(nodes: list[onnx.NodeProto], op_type: str, what: str) -> onnx.NodeProto:
    matching = [n for n in nodes if n.op_type == op_type]
    if len(matching) != 1:
        raise NoMatch(f"{what}: {len(matching)} {op_type} readers, expected 1")
    return matching[0]


def _constant(graph: onnx.GraphProto, name: str) -> list[float] | None:
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return [float(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
    node = _producer_or_none(graph, name)
    if node is not None and node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None:
            return [float(v) for v in numpy_helper.to_array(value).reshape(-1)]
    return None


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced before it is read."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    available |= {"", SEQLENS_INPUT, TOTAL_INPUT}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise NoMatch("the rewritten graph has a cycle or a dangling input")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        ordered.extend(ready)
        available.update(o for n in ready for o in n.output)
    return ordered
