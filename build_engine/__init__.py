"""Offline build: load a model, export it to ONNX, check parity, write a bundle.

Imports torch/transformers/optimum lazily inside the submodules that need them, so that the
package itself stays cheap to import (e.g. for `edge-build --help`).
"""

__version__ = "0.1.0"
