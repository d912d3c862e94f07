"""Quantized graphs for ONNX Runtime's CPU provider: whatever it runs fastest, contrib ops allowed.

- int8 and int4: `MatMulNBits` (com.microsoft) from onnxruntime's MatMulNBitsQuantizer, with 8 or
  4 bits per weight in blocks along K; block size, symmetry and accuracy level chosen on
  measurement (constants below). accuracy_level 4 lets the kernel quantize the activations to int8
  per row and block and use int8 dot products (AVX2/AVX-512 VNNI): the fastest setting, and as
  accurate as level 0. The lm_head is quantized too: it is a fifth of this model's weights and
  leaving it fp32 cost a third of the speed-up.
  int8 is *not* `quantize_dynamic` (DynamicQuantizeMatMul): that quantizes each MatMul input with
  one per-tensor range per call, and in a prefill the first token's "massive activations" (up to
  2000x the typical value in the MLP down projections) set that range for every token. Measured on
  SmolLM2-135M: next-token agreement 73% (prefill positions 58%) and a wrong greedy answer, against
  96% for MatMulNBits int8, which is also faster; excluding down_proj from dynamic quantization
  gave 85% at only 1.3x fp32 speed.
- fp16: ONNX Runtime's CPU provider has almost no fp16 kernels (x86 MLAS computes fp32), so an
  fp16 graph would run through inserted Casts and be slower than fp32. The honest CPU "fp16" is
  fp16 *storage*: weights are stored fp16 (half the disk and download) behind a Cast to fp32, which
  ONNX Runtime constant-folds at session start, so it runs at fp32 speed with fp32 activations.

The lm_head weight is tied with the embedding table (one initializer read by the embedding Gather
and the lm_head MatMul). The quantizer only replaces the MatMul's input, so the Gather keeps
reading the fp32 table: the graph stays correct, and the table is stored twice (fp32 for the
lookup, quantized for the lm_head), which costs disk but not speed (the lookup reads one column).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engine.quantize.common import (
    Precision,
    Progress,
    TiedHead,
    find_lm_head,
    load_model,
    save_model,
)
from build_engine.quantize.cpu_attention import (
    has_cpu_attention,
    trim_rotary_tables,
    use_group_query_attention,
)
from build_engine.quantize.fuse_linear import fuse_parallel_matmuls
from build_engine.quantize.logits_slice import slice_logits_input

if TYPE_CHECKING:
    import onnx

# Chosen on measurement (SmolLM2-135M, 2 cores, AVX-512 VNNI; tables in the integration report):
INT4_BLOCK = 32  # block 128 lost ~10 points of next-token agreement for no measurable speed gain
INT4_ACCURACY_LEVEL = 4  # int8 activations: fastest, same accuracy as level 0
INT4_SYMMETRIC = False  # asymmetric blocks: +3 points agreement, speed within noise
# The lm_head stays int4 too. Measured with it at 8 bits (a second quantizer pass over that node):
# top-1 0.625 -> 0.677, ppl ratio 1.370 -> 1.269, golden 0.200 -> 0.267, but decode -5% (213.8 ->
# 202.9 tok/s) and +15 MB: below the int4 >= 3x fp32 speed target on this machine.
# Block 128 measured 0.923 top-1 / 0.43 golden on a fresh export (fails the int8 gate); block 32
# gave 0.962 / 0.57 at the same speed. Level 1 (fp32 activations) is accurate but 5x slower here.
INT8_BLOCK = 32
INT8_ACCURACY_LEVEL = 4
# precision -> (bits, block size, accuracy level, symmetric)
NBITS = {
    "int8": (8, INT8_BLOCK, INT8_ACCURACY_LEVEL, True),
    "int4": (4, INT4_BLOCK, INT4_ACCURACY_LEVEL, INT4_SYMMETRIC),
}


def quantize_cpu(
    src_onnx: Path,
    staging: Path,
    *,
    precision: Precision,
    calibration: list[list[int]],
    progress: Progress,
    max_positions: int = 0,
) -> tuple[str, dict[str, Any]]:
    """Write the cpu graph for `precision` into `staging`; return (method, details).

    `max_positions` (the bundle's context length; 0 = keep all) bounds the rotary tables."""
    del calibration  # dynamic int8 and weight-only int4 need no activation statistics
    model, head, details = cpu_graph(src_onnx, max_positions)
    if precision == "fp32":
        return _fp32_graph(model, staging, progress, details)
    if precision == "fp16":
        return _fp16_storage(model, staging, progress, details)
    bits, block, level, symmetric = NBITS[precision]
    progress(
        f"cpu {precision}: MatMulNBits {bits}-bit, block {block}, accuracy level {level}, "
        f"{'symmetric' if symmetric else 'asymmetric'}"
    )
    return _nbits(
        model, head, staging, details, bits=bits, block=block, level=level, symmetric=symmetric
    )


def _nbits(
    model: onnx.ModelProto,
    head: TiedHead,
    staging: Path,
    graph_details: dict[str, Any],
    *,
    bits: int,
    block: int,
    level: int,
    symmetric: bool,
) -> tuple[str, dict[str, Any]]:
    """Every linear layer, lm_head included, as a com.microsoft MatMulNBits (RTN weights)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block,
        is_symmetric=symmetric,
        accuracy_level=level,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
        bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block,
        is_symmetric=symmetric,
        accuracy_level=level,
        nodes_to_exclude=[],
        algo_config=config,
    )
    quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    nbits = [n.name for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    save_model(quantized, staging)
    symmetry = "symmetric" if symmetric else "asymmetric"
    method = f"onnxruntime MatMulNBits int{bits}, block {block}, accuracy level {level}, {symmetry}"
    details: dict[str, Any] = {
        "matmulnbits": len(nbits),
        "bits": bits,
        "block_size": block,
        "accuracy_level": level,
        "symmetric": symmetric,
        "algorithm": "RTN",
        "lm_head": f"int{bits}" if f"{head.matmul}_Q{bits}" in nbits else "fp32",
        "embedding": "fp32 table (the Gather keeps reading the original tied initializer)",
        **graph_details,
    }
    return method, details


def cpu_graph(
    src: Path, max_positions: int = 0
) -> tuple[onnx.ModelProto, TiedHead, dict[str, Any]]:
    """The fp32 graph every cpu precision starts from: RoPE/RMSNorm fused, q|k|v and gate|up
    merged, attention on shared KV buffers, the lm_head run for the wanted positions only.

    An fp32 bundle built for cpu already holds this graph: it is taken as it is."""
    if has_cpu_attention(src):
        model = load_model(src)
        return model, find_lm_head(model), {"graph": "the reference's own cpu graph, unchanged"}
    model, fusion = fuse_for_cpu(src)
    head = find_lm_head(model)
    merged = fuse_parallel_matmuls(model)  # after find_lm_head: the lm_head is never merged
    attention = use_group_query_attention(model)  # reads the merged q|k|v as one packed input
    if attention["applied"] and max_positions:
        attention["rotary_rows"] = trim_rotary_tables(model, max_positions)
    last_logits = slice_logits_input(model, head.matmul)
    return (
        model,
        head,
        {
            "fusion": fusion,
            "merged_linear_layers": merged,  # q|k|v and gate|up as one MatMul each
            "attention": attention,
            "lm_head_positions": "last only when generating" if last_logits else "all",
        },
    )


def fuse_for_cpu(src: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The graph with RoPE and RMSNorm(+residual) fused into ONNX Runtime contrib ops, if possible.

    onnxruntime's transformer optimizer (its decoder-with-RoPE/RMSNorm recipe, model type
    "qwen3") rewrites the exported rotary subgraphs into `RotaryEmbedding` (fed by our per-row
    position_ids, so left-padded batches stay right) and each residual Add + RMSNorm into
    `SkipSimplifiedLayerNormalization`: about 1500 fewer small nodes per decode step, +13% decode
    speed on SmolLM2-135M int4. Attention is left to `cpu_attention` (GroupQueryAttention over
    shared KV buffers), which starts from this fused graph. The rewrite is pattern matching: when
    it does not match, or fails, the unfused graph is used (recorded in details); the accuracy
    gate checks the result either way.
    """
    import onnx

    structure = onnx.load(str(src), load_external_data=False)
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        past = next(i for i in structure.graph.input if i.name.startswith("past_key_values."))
        head_dim = past.type.tensor_type.shape.dim[3].dim_value
        inits = {t.name: t for t in structure.graph.initializer}
        first = next(
            n for n in structure.graph.node if n.op_type == "MatMul" and n.input[1] in inits
        )
        hidden = int(inits[first.input[1]].dims[0])
        fused = optimize_model(
            str(src),
            model_type="qwen3",
            num_heads=hidden // head_dim,
            hidden_size=hidden,
            opt_level=0,
        ).model
    except Exception as e:  # the optimizer raises assorted errors on patterns it cannot handle
        return load_model(src), {"applied": False, "reason": f"{type(e).__name__}: {e}"[:300]}
    ops = ("RotaryEmbedding", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
    counts = {op: sum(1 for n in fused.graph.node if n.op_type == op) for op in ops}
    if not any(counts.values()):
        return load_model(src), {"applied": False, "reason": "no pattern matched"}
    return fused, {
        "applied": True,
        "nodes": counts,
        "before": len(structure.graph.node),
        "after": len(fused.graph.node),
    }


def _fp32_graph(
    model: onnx.ModelProto, staging: Path, progress: Progress, graph_details: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    progress("cpu fp32: fused operators and attention on shared KV buffers, weights unchanged")
    save_model(model, staging)
    return "fp32 weights, ONNX Runtime CPU graph", graph_details


def _fp16_storage(
    model: onnx.ModelProto, staging: Path, progress: Progress, graph_details: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    progress("cpu fp16: fp16 weight storage behind Casts (ONNX Runtime computes in fp32)")
    converted = store_weights_fp16(model)
    save_model(model, staging)
    method = "fp16 weight storage, Cast to fp32 at load (ONNX Runtime CPU computes fp32)"
    details: dict[str, Any] = {
        "fp16_initializers": converted,
        "compute": "fp32 (ONNX Runtime folds the Casts at session start)",
        "why": "ONNX Runtime's CPU provider has no fp16 MatMul on x86; fp16 compute would be "
        "slower than fp32 through inserted Casts",
        **graph_details,
    }
    return method, details


def store_weights_fp16(model: onnx.ModelProto) -> int:
    """Store every fp32 weight matrix as fp16, with one Cast back to fp32 in front of its users.

    Only rank >= 2 initializers: the 1-D norm weights and scalars are tiny and sit in RMSNorm.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    renamed: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        values = numpy_helper.to_array(tensor)
        half = f"{tensor.name}_fp16"
        original = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), half))
        cast_out = f"{original}_fp32"
        casts.append(helper.make_node("Cast", [half], [cast_out], name=f"{half}_cast", to=1))
        renamed[original] = cast_out
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    nodes = [*casts, *graph.node]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return len(casts)
