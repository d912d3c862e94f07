"""Does a candidate bundle fit in memory beside the model that is serving?

The installer loads and tests the candidate while the old model keeps answering jobs, so both are
resident at once. Before loading it, the candidate's size from its verified manifest is compared
with the memory the kernel says is available (`MemAvailable`, which already excludes the serving
model); a candidate that does not fit is refused `no_memory` instead of being loaded into an
out-of-memory kill, which would take the serving model down with it. On a Jetson, CPU and GPU
share that memory, so the same figure covers a TensorRT engine.

The estimate: loading SmolLM2-135M (544 MB of files) with ONNX Runtime raised the process's RSS by
657 MB, i.e. 1.21x the bundle; LOAD_FACTOR rounds that up, and RESERVE_BYTES is left for the rest
of the device (the agent's own growth, the KV cache of the running batch, other processes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from agent.bundle import Manifest
from agent.ota.errors import OtaError

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
LOAD_FACTOR = 1.25  # resident bytes per byte of bundle files, measured 1.21 (module docstring)
RESERVE_BYTES = 256 << 20  # kept free for everything else on the device
MIB = 1 << 20

# Returns the bytes available for a new allocation, or None when the platform does not say.
MemoryReader = Callable[[], "int | None"]


def read_mem_available(meminfo: Path = MEMINFO) -> int | None:
    """`MemAvailable` from /proc/meminfo in bytes; None where there is no such file or line
    (not Linux, or a kernel older than 3.14)."""
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            fields = rest.split()
            try:
                value = int(fields[0])
            except (IndexError, ValueError):
                return None
            unit = fields[1].lower() if len(fields) > 1 else "b"
            return value * 1024 if unit == "kb" else value
    return None


def bundle_bytes(manifest: Manifest) -> int:
    """The size of every file the manifest lists: the weights, plus the (small) tokenizer."""
    return sum(int(entry["size"]) for entry in manifest.files.values())


def required_bytes(manifest: Manifest) -> int:
    """What loading the candidate is expected to take, the device's reserve included."""
    return int(bundle_bytes(manifest) * LOAD_FACTOR) + RESERVE_BYTES


def check_fits(manifest: Manifest, read_available: MemoryReader = read_mem_available) -> None:
    """Refuse the candidate `no_memory` unless it fits beside the serving model."""
    available = read_available()
    if available is None:
        log.warning("free memory unknown (no MemAvailable): loading the candidate unchecked")
        return
    needed = required_bytes(manifest)
    if needed > available:
        raise OtaError(
            "no_memory",
            f"the new bundle does not fit beside the serving model: loading it takes about "
            f"{needed // MIB} MiB ({bundle_bytes(manifest) // MIB} MiB of files x {LOAD_FACTOR} "
            f"+ {RESERVE_BYTES // MIB} MiB kept free) but only {available // MIB} MiB is "
            "available; the serving model was left running. Free memory on the device (or "
            "update to a smaller bundle) and send the update again with a new id",
        )
    log.info("the candidate fits: about %d MiB needed, %d MiB available", needed // MIB,
             available // MIB)  # fmt: skip
