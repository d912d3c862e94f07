"""Quantized graphs for the Jetson AGX Orin: plain ONNX that TensorRT 10.3 (JetPack 6.1/6.2) parses.

Rules every graph here follows (`contrib_ops()` must stay empty, and `quantize_orin` checks it):

- Standard ONNX ops only. TensorRT's parser has no com.microsoft ops; see the operator matrix in
  onnx-tensorrt `docs/operators.md` ("TensorRT 10.x supports operators ... opset 9 to opset 20";
  QuantizeLinear/DequantizeLinear: INT8, INT4, `x_zero_point` must be zero).
- Explicit quantization: DequantizeLinear on the weights, symmetric scales, zero points 0.
  TensorRT's implicit INT8 calibrators are deprecated since 10.1; Q/DQ graphs are the supported
  way (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
  quantized-types-explicit-quantization.html, work-quantized-types.html: "TensorRT employs a
  symmetric quantization scheme ... INT4 (signed 4-bit integer, weight-only quantization)").

The plan per precision (each step is its own module, where its measurements are written down):

- fp16 (`fp16.to_fp16`): a strongly typed fp16 graph, KV cache included, with fp32 islands for
  RMSNorm's variance, mask + Softmax and the RoPE angles; logits fp32.
- int8 (`int8_weights.insert_weight_dq`): weight-only int8 (W8A16), per output channel; W8A8
  was measured and does not reach the int8 accuracy gate (see that module).
- int4 (`int4_weights`): weight-only int4, symmetric, block 128, scales from an
  activation-weighted clip search on the calibration text; opset 21.

In the int8 and int4 graphs the lm_head (tied with the embedding table) stays fp32.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from build_engine.errors import BuildError
from build_engine.quantize.common import (
    ONNX_NAME,
    Precision,
    Progress,
    contrib_ops,
    find_lm_head,
    load_model,
    opset_version,
    save_model,
    weight_matmuls,
)
from build_engine.quantize.fp16 import to_fp16
from build_engine.quantize.int4_weights import (
    INT4_BLOCK,
    INT4_OPSET,
    channel_second_moments,
    insert_int4_weight_dq,
)
from build_engine.quantize.int8_weights import insert_weight_dq

_LM_HEAD_FP32 = "lm_head (tied with the embedding table): kept fp32"


def quantize_orin(
    src_onnx: Path,
    staging: Path,
    *,
    precision: Precision,
    calibration: list[list[int]],
    progress: Progress,
) -> tuple[str, dict[str, Any]]:
    """Write the orin graph for `precision` into `staging`; return (method, details)."""
    if precision == "fp16":
        method, details = _fp16_graph(src_onnx, staging, progress)
    elif precision == "int8":
        method, details = _int8_graph(src_onnx, staging, progress)
    else:
        method, details = _int4_graph(src_onnx, staging, calibration, progress)
    import onnx

    written = onnx.load(str(staging / ONNX_NAME), load_external_data=False)
    foreign = contrib_ops(written)
    if foreign:
        raise BuildError(
            "quantize_failed",
            f"the orin {precision} graph holds non-standard ops TensorRT cannot parse: "
            + ", ".join(foreign[:5]),
        )
    details["opset"] = opset_version(written)
    return method, details


def _fp16_graph(src: Path, staging: Path, progress: Progress) -> tuple[str, dict[str, Any]]:
    progress("orin fp16: strongly typed fp16 graph (fp32 islands for norms, softmax, RoPE)")
    model = load_model(src)
    details = to_fp16(model)
    save_model(model, staging)
    method = "strongly typed fp16 (fp16 weights, activations and KV cache; fp32 RMSNorm variance, "
    method += "mask+softmax, RoPE angles; fp32 logits)"
    return method, details


def _int8_graph(src: Path, staging: Path, progress: Progress) -> tuple[str, dict[str, Any]]:
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
        "activations": "not quantized (weight-only int8)",
        "excluded": {head.matmul: _LM_HEAD_FP32},
    }
    return method, details


def _int4_graph(
    src: Path, staging: Path, calibration: list[list[int]], progress: Progress
) -> tuple[str, dict[str, Any]]:
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
    rewritten = insert_int4_weight_dq(model, linear, moments)
    save_model(model, staging)
    method = (
        f"weight-only int4, symmetric, block {INT4_BLOCK}, activation-weighted clip search "
        "(AWQ-style, no new dependencies), DequantizeLinear(block_size) + MatMul; lm_head fp32"
    )
    details = {
        "int4_matmuls": rewritten,
        "block_size": INT4_BLOCK,
        "symmetric": True,
        "algorithm": (
            "per block: the scale (clip ratio 0.6-1.0, two rounding grids) that minimises the "
            "output error sum_k E[x_k^2] (w_k - q_k s)^2 on the calibration activations"
        ),
        "calibration_samples": 2 * len(calibration),
        "statistics_s": round(stats_s, 1),
        "excluded": {head.matmul: "lm_head (tied with the embedding Gather): kept fp32"},
        "opset_note": f"opset {INT4_OPSET} / IR 10 (INT4 and DequantizeLinear block_size)",
    }
    return method, details
