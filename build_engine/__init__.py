"""Offline build: load a model, export it to ONNX, check parity, write a bundle.

Imports torch/transformers/optimum lazily inside the submodules that need them, so that the
package itself stays cheap to import (e.g. for `edge-build --help`). ONNX Runtime (imported by
optimum, the quantizers, parity and the gate) gets its telemetry switched off first, as in the
agent: a build sends nothing anywhere and writes nothing outside its output.
"""

from agent.ort_telemetry import disable_ort_telemetry

disable_ort_telemetry()

__version__ = "0.1.0"
