"""Free-disk checks for the build: fail in the first seconds with a clear error, not after an hour.

A 3B export writes ~12 GB of fp32 weights before a quantized bundle exists; a disk that fills
half-way through used to surface as `OSError: [Errno 28]` from deep inside a writer. The estimates
here are lower bounds of what the steps we control write (the fp32 ONNX copy, the quantized
copy); when they pass and the disk still fills, `disk_full_error` turns the OSError into the same
coded error at the CLI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import shutil
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

from build_engine.errors import BuildError

GIB = 1 << 30
MARGIN = 256 << 20  # graph, tokenizer, golden file, report, the largest tensor in flight

# Bytes of the output per byte of fp32 weights, by precision (int8/int4 keep lm_head and
# embeddings wider, hence more than 1/4 and 1/8).
SIZE_VS_FP32 = {"fp32": 1.0, "fp16": 0.5, "int8": 0.3, "int4": 0.2}


def export_need(fp32_weight_bytes: int, precision: str, target: str = "orin") -> int:
    """Bytes an export to `precision` writes at its peak: the fp32 reference, plus the bundle
    derived from it when one is asked for (quantized, or the fp32 cpu graph; the fp32 ONNX is
    copied tensor by tensor with the source deleted behind it, so it counts once)."""
    derived = precision != "fp32" or target == "cpu"
    extra = SIZE_VS_FP32.get(precision, 1.0) if derived else 0.0
    return int(fp32_weight_bytes * (1.0 + extra)) + MARGIN


def require_free_space(directory: Path, need: int, purpose: str) -> None:
    """Raise `disk_full` when `directory`'s filesystem has less than `need` bytes free."""
    free = shutil.disk_usage(_existing(directory)).free
    if free < need:
        raise BuildError(
            "disk_full",
            f"{purpose} needs at least {need / GIB:.1f} GiB free in {directory}, "
            f"but only {free / GIB:.1f} GiB is free; free some space or pass an --out "
            "on a larger disk (the build stages its files next to --out)",
        )


def disk_full_error(exc: OSError, where: Path) -> BuildError | None:
    """The coded error for a disk that filled up during the build, or None for other OSErrors."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    free = shutil.disk_usage(_existing(where)).free
    return BuildError(
        "disk_full",
        f"the disk holding {where} filled up during the build ({exc.strerror}; "
        f"{free / GIB:.1f} GiB free now that the partial files are removed); "
        "nothing was written to --out",
    )


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: disk_usage needs a path that exists."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# fallocate(2) modes: free the blocks of a byte range, keep the file's size (reads give zeros).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def release_range(fd: int, offset: int, length: int) -> bool:
    """Give the disk blocks of `length` bytes at `offset` of an open file back to the filesystem
    (Linux `fallocate` hole punching: ext4, XFS, btrfs, tmpfs). Returns False where that is not
    supported (other systems, other filesystems): the bytes then stay until the file is deleted,
    which costs disk, never correctness. Only blocks wholly inside the range are freed; partial
    blocks at its ends are zeroed inside the range and left alone outside it."""
    if length <= 0:
        return True
    fallocate = _libc_fallocate()
    if fallocate is None:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return int(fallocate(fd, mode, offset, length)) == 0


@cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate
