"""On-device runtime: loads a model bundle, answers jobs over MQTT.

Imports no torch or transformers: the device carries only ONNX Runtime (or TensorRT),
`tokenizers` and jinja2.
"""

__version__ = "0.1.0"
