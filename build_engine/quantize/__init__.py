"""Quantize the fp32 ONNX decoder for a target: `cpu` (ONNX Runtime) or `orin` (TensorRT 10.x).

`quantize(src, out_dir, precision=..., target=..., calibration=..., progress=...)` writes exactly
`model.onnx` + `model.onnx.data` into `out_dir` and returns a `QuantResult`; see `common.py` for
the contract, `cpu.py` and `orin.py` for what each combination builds and why.
"""

from build_engine.quantize.common import QuantResult, contrib_ops, quantize

__all__ = ["QuantResult", "contrib_ops", "quantize"]
