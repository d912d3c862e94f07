"""Quantize the fp32 ONNX decoder for a target: `cpu` (ONNX Runtime) or `orin` (TensorRT 10.x).

`quantize(src, out_dir, precision=..., target=..., calibration=..., progress=...)` writes exactly
`model.onnx` + `model.onnx.data` into `out_dir` and returns a `QuantResult`; see `dispatch.py` for
the contract, `cpu.py` and `orin.py` for what each combination builds and why, and `common.py` for
what they share (the leaf every other module here builds on).
"""

from build_engine.quantize.common import contrib_ops
from build_engine.quantize.dispatch import QuantResult, quantize

__all__ = ["QuantResult", "contrib_ops", "quantize"]
