"""`quantize()`: the fp32 decoder for a target, `cpu` (ONNX Runtime) or `orin` (TensorRT 10.x).

The one module that knows both targets: it picks `cpu.quantize_cpu` or `orin.quantize_orin`, lets
it write into a staging directory next to `out_dir`, and moves exactly `model.onnx` +
`model.onnx.data` into place. ONNX Runtime's quantizers leave augmented models and other scratch
files behind, and the bundle must hold nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engine.errors import BuildError
from build_engine.quantize.common import DATA_NAME, ONNX_NAME, Precision, Progress, Target
from build_engine.quantize.cpu import quantize_cpu
from build_engine.quantize.orin import quantize_orin


@dataclass(frozen=True)
class QuantResult:
    """What `quantize` wrote and how; `details` goes into the bundle manifest, so it is JSON."""

    onnx_path: Path
    precision: Precision
    target: Target
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def data_path(self) -> Path:
        return self.onnx_path.parent / DATA_NAME


def quantize(
    src_onnx: Path,
    out_dir: Path,
    *,
    precision: Precision,
    target: Target,
    calibration: list[list[int]],
    progress: Progress,
    max_positions: int = 0,
) -> QuantResult:
    """Quantize the fp32 decoder `src_onnx` into `out_dir` (exactly model.onnx + model.onnx.data).

    fp32 for cpu is not a quantization but the same rewrite every cpu graph gets (fused
    operators, attention on shared KV buffers) with the weights left as they are.

    `calibration` holds token-id sequences of real text; only orin int4 uses them (activation
    statistics for its clip search), the others ignore them. `max_positions` (the bundle's
    context length) bounds what the cpu graphs store per position.
    """
    if precision not in ("fp32", "fp16", "int8", "int4"):
        raise BuildError(
            "bad_precision", f"cannot quantize to {precision!r}: fp32, fp16, int8 or int4"
        )
    if target not in ("cpu", "orin"):
        raise BuildError("bad_target", f"unknown target {target!r}: cpu or orin")
    if precision == "fp32" and target == "orin":
        raise BuildError(
            "bad_precision",
            "the fp32 graph for orin is the exported reference itself (edge-build export "
            "--target orin --precision fp32); there is nothing to quantize",
        )
    if not src_onnx.is_file():
        raise BuildError("missing_model", f"no ONNX graph at {src_onnx}")
    started = time.perf_counter()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out_dir.parent))
    try:
        if target == "cpu":
            method, details = quantize_cpu(
                src_onnx,
                staging,
                precision=precision,
                calibration=calibration,
                progress=progress,
                max_positions=max_positions,
            )
        else:
            method, details = quantize_orin(
                src_onnx, staging, precision=precision, calibration=calibration, progress=progress
            )
        for name in (ONNX_NAME, DATA_NAME):
            if not (staging / name).is_file():
                raise BuildError(
                    "quantize_failed", f"the {precision} {target} step wrote no {name}"
                )
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    details = {**details, "seconds": round(seconds, 1)}
    return QuantResult(out_dir / ONNX_NAME, precision, target, method, details, seconds)
