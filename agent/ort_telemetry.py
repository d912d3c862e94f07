"""ONNX Runtime without its telemetry.

Since 1.2x the Linux wheels carry the 1DS telemetry client: on the first environment it looks up
`mobile.events.data.microsoft.com` (DNS, then HTTPS) and creates
`~/.cache/Microsoft/DeveloperTools/.onnxruntime/` (a device id, an SQLite event store).
`onnxruntime.disable_telemetry_events()` does not stop it (measured under strace with 1.32); only
the environment variable `ORT_DISABLE_TELEMETRY`, read when the native library initialises, does.
So it is set before the first `import onnxruntime` of the agent (`agent.backends`) and of the build
(`build_engine`); child processes (bench contestants) inherit it.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "ORT_DISABLE_TELEMETRY"

log = logging.getLogger(__name__)


def disable_ort_telemetry() -> None:
    """Force the variable on (a device never opts in), and say so if it comes too late."""
    os.environ[ENV_VAR] = "1"
    if "onnxruntime.capi._pybind_state" in sys.modules:
        log.warning(
            "onnxruntime was imported before %s was set: its telemetry may be on in this process",
            ENV_VAR,
        )
