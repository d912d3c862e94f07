"""Inference backends behind one interface (`agent.backends.base.Backend`).

Every module here that uses ONNX Runtime is imported through this package, so this is where its
telemetry is switched off, before the native library loads: otherwise each process resolves
`mobile.events.data.microsoft.com` and writes a device id and an event database under
`~/.cache/Microsoft/DeveloperTools/`, outside the state dir. Nothing of a device leaves its site.
"""

from agent.ort_telemetry import disable_ort_telemetry

disable_ort_telemetry()
