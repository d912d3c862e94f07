"""A TensorRT logger that speaks through Python's logging and keeps the errors.

TensorRT reports why a build or a parse failed only through its logger; keeping the error lines
lets a BuildError carry them instead of leaving the user to scroll back.
See https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html
(a custom logger subclasses `trt.ILogger` and calls its `__init__` explicitly).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

log = logging.getLogger("tensorrt")


def make_logger(trt: ModuleType, *, verbose: bool = False) -> Any:
    """A `trt.ILogger` with an `errors` list of every ERROR / INTERNAL_ERROR message."""
    severity = trt.ILogger.Severity
    levels = {
        int(severity.INTERNAL_ERROR): logging.CRITICAL,
        int(severity.ERROR): logging.ERROR,
        int(severity.WARNING): logging.WARNING,
        int(severity.INFO): logging.INFO,
        int(severity.VERBOSE): logging.DEBUG,
    }
    quietest = int(severity.VERBOSE if verbose else severity.WARNING)

    class CollectingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if int(level) <= int(severity.ERROR):
                self.errors.append(message)
            if int(level) <= quietest:
                log.log(levels.get(int(level), logging.INFO), "%s", message)

    return CollectingLogger()
