"""Quantized graphs for the Jetson AGX Orin: plain ONNX that TensorRT 10.3 (JetPack 6.1/6.2) parses.

Rules every graph here follows (`contrib_ops()` must stay empty):

- Standard ONNX ops only. TensorRT's parser has no com.microsoft ops; see the operator matrix in
  onnx-tensorrt `docs/operators.md` ("TensorRT 10.x supports operators ... opset 9 to opset 20";
  QuantizeLinear/DequantizeLinear: INT8, INT4, `x_zero_point` must be zero).
- Explicit quantization: QuantizeLinear/DequantizeLinear (Q/DQ) pairs, symmetric scales, zero
  points 0. TensorRT's implicit INT8 calibrators are deprecated since 10.1; Q/DQ graphs are the
  supported way (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
  quantized-types-explicit-quantization.html, work-quantized-types.html: "TensorRT employs a
  symmetric quantization scheme ... INT4 (signed 4-bit integer, weight-only quantization)").

Per precision:

- fp16: a strongly typed FP16 graph (`to_fp16`): every float tensor fp16, KV cache included, with
  RMSNorm's variance chain, the attention mask add + Softmax and the RoPE angle computation kept in
  fp32 behind explicit Casts (strongly typed TensorRT honours exactly these types). Logits stay
  fp32 (one Cast after lm_head), so every backend reads the same output type and the sampling code
  never sees fp16 rounding of close logits.
- int8: weight-only int8 (W8A16): per-output-channel symmetric int8 weights behind
  DequantizeLinear, activations fp32/fp16, lm_head (tied with the embedding) fp32. W8A8 was built
  and measured (`int8_activations=True`: Q/DQ on activations from MinMax calibration on real text
  with a real KV past, per-channel weights) and does not reach the int8 accuracy gate (top-1
  >= 0.92) on SmolLM2-135M: all layers W8A8 0.42 (garbage); without the MLP down projections,
  whose inputs carry the first token's 30-2000x "massive activations", 0.84; also without o_proj
  0.86. Weight-only int8 gives 0.95. A 3B model may tolerate W8A8; re-measure before switching.
- int4: weight-only, symmetric, block 128, as DequantizeLinear(block_size=128) + MatMul; lm_head
  (and so the tied embedding table) stays fp32. Scales come from an activation-weighted clip
  search (`quantize_int4_blocks`, AWQ-style, numpy only): next-token agreement 0.68 against 0.65
  for onnxruntime's RTN at the same settings, and the right greedy answer where RTN's was wrong.
  NVIDIA ModelOpt's AWQ was not used: it pulls onnxruntime-gpu and cupy, which conflict with the
  CPU onnxruntime the agent runs on. Blocked DequantizeLinear and the INT4 type are ONNX opset 21 /
  IR 10, so these graphs declare opset 21 although the onnx-tensorrt operator matrix for 10.x
  documents opsets 9-20: TensorRT 10.0 added INT4 weight-only block quantization to the parser
  (release notes 10.0.0, "Added support for INT4 quantization"; work-quantized-types.html).
  Check `trtexec --onnx` on a JetPack 6.1 device before relying on it.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engine.errors import BuildError
from build_engine.quantize.common import (
    CalibrationFeeds,
    Precision,
    Progress,
    consumers,
    contrib_ops,
    find_lm_head,
    load_model,
    opset_version,
    save_model,
    set_opset_version,
    weight_matmuls,
)

if TYPE_CHECKING:
    import onnx

INT4_BLOCK = 128
_FP16_MAX = 65504.0
# Ops whose output describes a tensor's shape, not its values: they end the activation flow.
_METADATA_OPS = ("Shape", "Size")


def quantize_orin(
    src_onnx: Path,
    staging: Path,
    *,
    precision: Precision,
    calibration: list[list[int]],
    progress: Progress,
    int8_activations: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Write the orin graph for `precision` into `staging`; return (method, details).

    `int8_activations` selects W8A8 for int8 (see the module docstring for why the default is
    weight-only int8).
    """
    if precision == "fp16":
        method, details = _fp16(src_onnx, staging, progress)
    elif precision == "int8" and int8_activations:
        method, details = _int8(src_onnx, staging, calibration, progress)
    elif precision == "int8":
        method, details = _int8_weight_only(src_onnx, staging, progress)
    else:
        method, details = _int4(src_onnx, staging, calibration, progress)
    import onnx

    written = onnx.load(str(staging / "model.onnx"), load_external_data=False)
    foreign = contrib_ops(written)
    if foreign:
        raise BuildError(
            "quantize_failed",
            f"the orin {precision} graph holds non-standard ops TensorRT cannot parse: "
            + ", ".join(foreign[:5]),
        )
    details["opset"] = opset_version(written)
    return method, details


# --- fp16 ----------------------------------------------------------------------------------------


def _fp16(src: Path, staging: Path, progress: Progress) -> tuple[str, dict[str, Any]]:
    progress("orin fp16: strongly typed fp16 graph (fp32 islands for norms, softmax, RoPE)")
    model = load_model(src)
    details = to_fp16(model)
    save_model(model, staging)
    method = "strongly typed fp16 (fp16 weights, activations and KV cache; fp32 RMSNorm variance, "
    method += "mask+softmax, RoPE angles; fp32 logits)"
    return method, details


def to_fp16(model: onnx.ModelProto) -> dict[str, Any]:
    """Rewrite `model` in place so every float tensor is fp16 except the numerically sensitive ones.

    The modes come from data flow, not from node names:

    - a float tensor is an *activation* when it depends on a float graph input (the KV cache) or
      a float weight of rank >= 2 (embedding, projections); everything else (RoPE angles from
      position ids, the causal mask, shape arithmetic, scalar constants) is *static*;
    - activation nodes run in fp16, static nodes stay fp32 (the RoPE angle `position * inv_freq`
      loses whole radians in fp16 beyond position ~2000), and the islands below are forced fp32;
    - where a tensor meets a node of the other mode an explicit Cast is inserted; constants get a
      converted copy instead (clipped to +-65504, so finfo(float32).min masks stay finite).

    Islands: RMSNorm's `Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div/Reciprocal -> Mul(x, .)`
    (x**2 overflows fp16 once |x| > 256, and residual streams do reach that), and each Softmax
    together with the mask Add in front of it (adding a -3.4e38 mask in fp16 gives -inf rows).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        raise BuildError("quantize_failed", "fp16 conversion cannot handle control-flow subgraphs")
    types = _tensor_types(model)
    inits = {t.name: t for t in graph.initializer}
    consts = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    float_t = TensorProto.FLOAT

    def is_float(name: str) -> bool:
        return types.get(name) == float_t

    # 1. Which tensors carry activations (or weights): float graph inputs and rank >= 2
    # initializers of any type (int8/int4 weights behind a DequantizeLinear count too), and all
    # that is computed from them except shape metadata.
    active: set[str] = {i.name for i in graph.input if is_float(i.name)}
    active |= {t.name for t in graph.initializer if len(t.dims) >= 2}
    for node in graph.node:
        if node.op_type not in _METADATA_OPS and any(i in active for i in node.input):
            active.update(node.output)

    # 2. fp32 islands, then every node's mode.
    keep = _rmsnorm_islands(graph, consts, inits) | _softmax_islands(graph, active)
    fp16_nodes: set[int] = set()
    for idx, node in enumerate(graph.node):
        if node.op_type == "Constant" or node.name in keep:
            continue
        touches_float = any(is_float(t) for t in (*node.input, *node.output) if t)
        if (
            touches_float
            and node.op_type not in _METADATA_OPS
            and any(i in active for i in node.input)
        ):
            fp16_nodes.add(idx)

    # 3. Rebuild the node list with Casts and converted constants where modes meet.
    new_type: dict[str, int] = {}  # float tensors that end up fp16
    for idx, node in enumerate(graph.node):
        if idx in fp16_nodes:
            new_type.update({o: TensorProto.FLOAT16 for o in node.output if is_float(o)})
    for inp in graph.input:
        if is_float(inp.name):
            new_type[inp.name] = TensorProto.FLOAT16
            inp.type.tensor_type.elem_type = TensorProto.FLOAT16

    agnostic = {("Cast", 0), ("Shape", 0), ("Size", 0), ("IsNaN", 0), ("IsInf", 0)}
    casts: dict[tuple[str, int], str] = {}
    const_copies: dict[tuple[str, int], str] = {}
    converted_inits: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    stats = {"casts_inserted": 0, "fp32_island_nodes": len(keep)}

    # Constants whose every float consumer is fp16 are converted in place; the rest get copies.
    wants: dict[str, set[int]] = defaultdict(set)
    for idx, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            constant = (name in inits or name in consts) and is_float(name)
            if constant and (node.op_type, pos) not in agnostic:
                wants[name].add(TensorProto.FLOAT16 if idx in fp16_nodes else float_t)
    in_place = {n for n, w in wants.items() if w == {TensorProto.FLOAT16}}

    def fp16_array(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        clipped: np.ndarray[Any, Any] = np.clip(values, -_FP16_MAX, _FP16_MAX)
        return clipped.astype(np.float16)

    def to_half(tensor: onnx.TensorProto, name: str) -> None:
        tensor.CopyFrom(numpy_helper.from_array(fp16_array(numpy_helper.to_array(tensor)), name))

    for name in in_place:
        if name in inits:
            to_half(inits[name], name)
            converted_inits.add(name)
        else:
            to_half(consts[name].attribute[0].t, name)
        new_type[name] = TensorProto.FLOAT16

    def typed(name: str, want: int) -> str:
        have = new_type.get(name, float_t)
        if have == want:
            return name
        if name in inits or name in consts:
            key = (name, want)
            if key not in const_copies:
                source = inits[name] if name in inits else consts[name].attribute[0].t
                values = numpy_helper.to_array(source)
                copy_name = f"{name}__fp16"
                array = fp16_array(values) if want == TensorProto.FLOAT16 else values
                new_nodes.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [copy_name],
                        name=f"{copy_name}_const",
                        value=numpy_helper.from_array(array, copy_name),
                    )
                )
                const_copies[key] = copy_name
            return const_copies[key]
        key = (name, want)
        if key not in casts:
            suffix = "fp16" if want == TensorProto.FLOAT16 else "fp32"
            out = f"{name}__to_{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=out, to=want))
            casts[key] = out
            stats["casts_inserted"] += 1
        return casts[key]

    for idx, node in enumerate(graph.node):
        if node.op_type == "Constant":
            new_nodes.append(node)
            continue
        want = TensorProto.FLOAT16 if idx in fp16_nodes else float_t
        for pos, name in enumerate(node.input):
            if name and is_float(name) and (node.op_type, pos) not in agnostic:
                node.input[pos] = typed(name, want)
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == float_t:
                    attr.i = want
        elif node.op_type == "ConstantOfShape" and want == TensorProto.FLOAT16:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == float_t:
                    to_half(attr.t, attr.t.name)
        new_nodes.append(node)

    # 4. Outputs: KV presents become fp16; logits stay fp32 behind one Cast.
    for out in graph.output:
        if not is_float(out.name):
            continue
        if out.name == "logits":
            if new_type.get("logits") == TensorProto.FLOAT16:
                producer = next(n for n in new_nodes if "logits" in n.output)
                producer.output[list(producer.output).index("logits")] = "logits_fp16"
                cast = helper.make_node(
                    "Cast", ["logits_fp16"], ["logits"], name="logits_to_fp32", to=float_t
                )
                new_nodes.append(cast)
        elif new_type.get(out.name) == TensorProto.FLOAT16:
            out.type.tensor_type.elem_type = TensorProto.FLOAT16

    graph.ClearField("node")
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    _check_types(model)
    stats["fp16_initializers"] = len(converted_inits)
    stats["fp32_initializers"] = sum(1 for t in graph.initializer if t.data_type == float_t)
    return {"fp16": stats, "logits": "float32", "kv_cache": "float16"}


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX shape inference on a weight-free copy."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        tensor.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(f)
        # keep small shape-carrying tensors readable for inference
    for src, dst in zip(model.graph.initializer, light.graph.initializer, strict=True):
        if src.HasField("raw_data") and len(src.raw_data) <= 1024:
            dst.raw_data = src.raw_data
    inferred = onnx.shape_inference.infer_shapes(light)
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

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) > 1024:
            tensor.ClearField("raw_data")
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises InferenceError and plain RuntimeErrors
        raise BuildError("quantize_failed", f"fp16 conversion left a type mismatch: {e}") from e


def _rmsnorm_islands(
    graph: onnx.GraphProto,
    consts: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
) -> set[str]:
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
    del consts, inits
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


# --- int8 ----------------------------------------------------------------------------------------


def _int8_weight_only(src: Path, staging: Path, progress: Progress) -> tuple[str, dict[str, Any]]:
    """Per-output-channel symmetric int8 weights behind DequantizeLinear; activations unchanged."""
    model = load_model(src)
    head = find_lm_head(model)
    linear = [n for n in weight_matmuls(model) if n != head.matmul]
    progress(f"orin int8: weight-only int8 (per output channel) on {len(linear)} MatMuls")
    done = insert_weight_dq(model, linear)
    save_model(model, staging)
    method = (
        "weight-only int8 (W8A16): per-channel symmetric int8 weights, DequantizeLinear + MatMul"
    )
    details = {
        "int8_weight_matmuls": len(done),
        "activations": "not quantized (W8A8 fails the int8 accuracy gate on this model family)",
        "w8a8_measured": {
            "q/k/v/o/gate/up W8A8 + down_proj W8A16": "next-token agreement 0.84",
            "all layers W8A8": "0.42, garbage answers",
            "this graph": "0.95",
        },
        "excluded": {head.matmul: "lm_head (tied with the embedding table): kept fp32"},
    }
    return method, details


def _int8(
    src: Path, staging: Path, calibration: list[list[int]], progress: Progress
) -> tuple[str, dict[str, Any]]:
    """W8A8 Q/DQ on the projections that tolerate it, W8A16 on the MLP down projections."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    structure = onnx.load(str(src), load_external_data=False)
    head = find_lm_head(structure)
    linear = weight_matmuls(structure)
    down = set(gated_down_projections(structure))
    w8a8 = [n for n in linear if n != head.matmul and n not in down]
    reader = CalibrationFeeds(src, calibration)
    progress(
        f"orin int8: calibrating {len(w8a8)} MatMul inputs on {len(reader)} samples "
        "(prefill chunks over a real past + decode steps)"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        quantize_static(
            str(src),
            f"{tmp}/model.onnx",
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=w8a8,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                # TensorRT: symmetric int8, zero points 0, per output channel (axis 1 of [K, N]).
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                # Only the MatMul inputs: quantizing MatMul outputs (ORT's default) would also
                # put int8 on the RoPE angles and the KV projections' outputs.
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )
        calibrated = time.perf_counter() - started
        progress("orin int8: weight-only int8 on the MLP down projections")
        model = load_model(Path(tmp) / "model.onnx")
    w8a16 = insert_weight_dq(model, sorted(down))
    save_model(model, staging)
    method = (
        "W8A8 Q/DQ (onnxruntime quantize_static, MinMax, symmetric int8, per-channel weights) on "
        "q/k/v/o/gate/up; weight-only int8 on down_proj; lm_head fp32"
    )
    details = {
        "w8a8_matmuls": len(w8a8),
        "w8a16_matmuls": len(w8a16),
        "calibration": {
            "method": "MinMax",
            "sequences": len(calibration),
            "samples": len(reader),
            "seconds": round(calibrated, 1),
        },
        "excluded": {
            head.matmul: "lm_head (tied with the embedding table): kept fp32",
            "down_proj": (
                "activation outliers (first-token 'massive activations', 30-2000x the typical "
                "range) make per-tensor int8 useless: W8A8 there gave garbage; weight-only int8"
            ),
            "attention QK^T / AV": "activation x activation: not quantized",
        },
    }
    return method, details


def gated_down_projections(model: onnx.ModelProto) -> list[str]:
    """Weight MatMuls fed by the gated-MLP product `act(gate(x)) * up(x)` (down_proj, any name).

    Found by structure: the MatMul's input is a Mul of two activations, one a MatMul output.
    (RMSNorm's weight Mul has an initializer input, so it never matches.)
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    found = []
    for name in weight_matmuls(model):
        node = next(n for n in graph.node if n.name == name)
        mul = producers.get(node.input[0])
        if mul is None or mul.op_type != "Mul" or any(i in inits for i in mul.input):
            continue
        sources = [producers.get(i) for i in mul.input]
        if any(src is not None and src.op_type == "MatMul" for src in sources):
            found.append(name)
    return found


def insert_weight_dq(model: onnx.ModelProto, matmuls: Iterable[str]) -> list[str]:
    """Per-output-channel symmetric int8 weights behind a DequantizeLinear (weight-only int8).

    Skips a MatMul whose weight has other readers (a tied table): rewriting it would change them.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    wanted = set(matmuls)
    done = []
    new_nodes = []
    for node in graph.node:
        if node.name in wanted and node.input[1] in inits and len(users[node.input[1]]) == 1:
            tensor = inits[node.input[1]]
            w = numpy_helper.to_array(tensor).astype(np.float32)
            scale = np.abs(w).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            qname, sname = f"{tensor.name}_int8", f"{tensor.name}_scale"
            graph.initializer.remove(tensor)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, qname),
                    numpy_helper.from_array(scale.astype(np.float32), sname),
                ]
            )
            out = f"{tensor.name}_dequantized"
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [qname, sname], [out], name=f"{node.name}_weight_dq", axis=1
                )
            )
            node.input[1] = out
            done.append(node.name)
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return done


# --- int4 ----------------------------------------------------------------------------------------


def _int4(
    src: Path, staging: Path, calibration: list[list[int]], progress: Progress
) -> tuple[str, dict[str, Any]]:
    """Block-128 symmetric int4 weights as DequantizeLinear + MatMul; lm_head left fp32."""
    model = load_model(src)
    head = find_lm_head(model)
    linear = [n for n in weight_matmuls(model) if n != head.matmul]
    nodes = {n.name: n for n in model.graph.node}
    started = time.perf_counter()
    moments: dict[str, np.ndarray[Any, Any]] = {}
    if calibration:
        progress(f"orin int4: input statistics of {len(linear)} MatMuls on the calibration text")
        moments = channel_second_moments(
            src, sorted({nodes[n].input[0] for n in linear}), calibration
        )
    stats_s = time.perf_counter() - started
    progress(f"orin int4: {len(linear)} weights -> int4 blocks of {INT4_BLOCK}, clip search")
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    clipped = 0
    for node in model.graph.node:
        if node.name in linear:
            new_nodes.append(_int4_weight_dq(model, node, inits, moments.get(node.input[0])))
            clipped += 1
        new_nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    set_opset_version(model, 21)  # INT4 and DequantizeLinear's block_size are opset 21
    model.ir_version = max(model.ir_version, 10)
    save_model(model, staging)
    method = (
        f"weight-only int4, symmetric, block {INT4_BLOCK}, activation-weighted clip search "
        "(AWQ-style, no new dependencies), DequantizeLinear(block_size) + MatMul; lm_head fp32"
    )
    details = {
        "int4_matmuls": clipped,
        "block_size": INT4_BLOCK,
        "symmetric": True,
        "algorithm": (
            "per block: the scale (clip ratio 0.6-1.0, two rounding grids) that minimises the "
            "output error sum_k E[x_k^2] (w_k - q_k s)^2 on the calibration activations"
        ),
        "calibration_samples": 2 * len(calibration),
        "statistics_s": round(stats_s, 1),
        "excluded": {head.matmul: "lm_head (tied with the embedding Gather): kept fp32"},
        "opset_note": "opset 21 / IR 10 (INT4 and DequantizeLinear block_size)",
    }
    return method, details


_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def quantize_int4_blocks(
    w: np.ndarray[Any, Any], importance: np.ndarray[Any, Any] | None, block: int = INT4_BLOCK
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Symmetric int4 of `w` [K, N] in blocks of `block` rows; returns (q [K, N] int8, s [kb, N]).

    Plain round-to-nearest with scale max|w|/7 wastes the -8 level and lets one large weight
    coarsen its whole block. For every block and column this tries the scales
    `r * extreme / -8` (the extreme value lands on -8, as onnxruntime's RTN does) and
    `r * max|w| / 7` for clip ratios r in 0.6-1.0, and keeps the one with the least error
    weighted by the input channel's mean square activation `importance` [K] (AWQ's observation:
    the weights that meet large activations matter most). Without statistics every channel
    weighs 1 (a plain MSE clip search).
    """
    k, n = w.shape
    blocks = -(-k // block)
    pad = blocks * block - k
    wb = np.pad(w.astype(np.float32), ((0, pad), (0, 0))).reshape(blocks, block, n)
    h = np.ones(k, np.float32) if importance is None else importance.astype(np.float32)
    hb = np.pad(h, (0, pad)).reshape(blocks, block, 1)
    top, bottom = wb.max(axis=1, keepdims=True), wb.min(axis=1, keepdims=True)
    extreme = np.where(top >= -bottom, top, bottom)
    amax = np.maximum(top, -bottom)
    best_s = best_err = None
    for ratio in _CLIP_RATIOS:
        for scale in (ratio * extreme / -8.0, ratio * amax / 7.0):
            scale = np.where(np.abs(scale) < 1e-12, 1e-12, scale)
            q = np.clip(np.rint(wb / scale), -8, 7)
            err = (hb * (wb - q * scale) ** 2).sum(axis=1, keepdims=True)
            if best_err is None or best_s is None:
                best_s, best_err = scale, err
            else:
                better = err < best_err
                best_s = np.where(better, scale, best_s)
                best_err = np.where(better, err, best_err)
    assert best_s is not None
    q = np.clip(np.rint(wb / best_s), -8, 7).astype(np.int8).reshape(blocks * block, n)[:k]
    return q, best_s.reshape(blocks, n).astype(np.float32)


def _int4_weight_dq(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    importance: np.ndarray[Any, Any] | None,
) -> onnx.NodeProto:
    """Replace `node`'s weight by int4 blocks + scales; return the DequantizeLinear to insert."""
    from onnx import TensorProto, helper, numpy_helper

    tensor = inits[node.input[1]]
    w = numpy_helper.to_array(tensor)
    q, scales = quantize_int4_blocks(w, importance)
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # first element in the low nibble
    qname, sname, out = f"{tensor.name}_int4", f"{tensor.name}_scale", f"{tensor.name}_dequantized"
    model.graph.initializer.remove(tensor)
    model.graph.initializer.extend(
        [
            helper.make_tensor(qname, TensorProto.INT4, list(w.shape), packed.tobytes(), raw=True),
            numpy_helper.from_array(scales, sname),
        ]
    )
    node.input[1] = out
    return helper.make_node(
        "DequantizeLinear",
        [qname, sname],
        [out],
        name=f"{node.name}_weight_dq",
        axis=0,
        block_size=INT4_BLOCK,
    )


def channel_second_moments(
    src: Path, tensors: list[str], calibration: list[list[int]]
) -> dict[str, np.ndarray[Any, Any]]:
    """Mean square of each channel (last axis) of `tensors` over the calibration feeds."""
    import onnx
    import onnxruntime as ort

    structure = onnx.load(str(src), load_external_data=False)
    known = {o.name for o in structure.graph.output}
    for name in tensors:
        if name not in known:
            structure.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The augmented graph is passed as bytes (nothing is written next to the reference bundle);
    # its weights are read from the source's external data file.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(src.parent)
    )
    session = ort.InferenceSession(
        structure.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    sums: dict[str, np.ndarray[Any, Any]] = {}
    rows = 0
    for feed in CalibrationFeeds(src, calibration):
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + (x * x).sum(axis=0)
        rows += int(np.prod(feed["input_ids"].shape))
    return {name: total / max(rows, 1) for name, total in sums.items()}
