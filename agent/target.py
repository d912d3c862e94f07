"""What this device is, and whether a compiled engine was built for it.

A TensorRT engine runs only where it was built: same GPU (compute capability and SM count), same
TensorRT version (by default an engine is compatible only with the TensorRT version that built
it), same CUDA. `edge-build compile` records those facts in the manifest's `target`; before the
agent deserializes an engine it compares them with this device and refuses a mismatch with a
message that says what differs, so a wrong engine never reaches TensorRT (which would fail with
an opaque error, or worse, run slowly on the wrong module).

Sources of the facts:
- `/etc/nv_tegra_release` for the Jetson Linux (L4T) release, e.g.
  `# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: ...`
  is L4T 36.4.4, which NVIDIA's JetPack archive (https://developer.nvidia.com/embedded/jetpack-archive,
  https://docs.nvidia.com/jetson/archives) pairs with JetPack 6.2.1;
- `/proc/device-tree/model` for the board, e.g. "NVIDIA Jetson AGX Orin Developer Kit";
- the GPU through `agent.backends.tensorrt.cuda` (pycuda), when it is installed;
- `tensorrt.__version__`, when TensorRT's Python bindings import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import BundleError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")

# Jetson Linux release -> JetPack, from NVIDIA's JetPack archive. Only JetPack 6 is listed: it is
# the first with TensorRT 10, which the engines need.
JETPACK_FOR_L4T = {
    "36.3": "6.0",
    "36.4": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}

_RELEASE_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class DeviceTarget:
    """The facts an engine depends on (None: not known here, e.g. no GPU or no TensorRT)."""

    device: str | None = None  # board model, for people: "NVIDIA Jetson AGX Orin Developer Kit"
    gpu: str | None = None  # "Orin"
    compute_capability: str | None = None  # "8.7"
    sm_count: int | None = None  # 16 on an AGX Orin, 8 on an Orin NX 16GB
    tensorrt: str | None = None  # "10.3.0.30"
    cuda: str | None = None  # CUDA version the driver supports, "12.6"
    l4t: str | None = None  # "36.4.4"
    jetpack: str | None = None  # "6.2.1"

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [
            self.device or self.gpu or "a machine without a usable NVIDIA GPU",
            f"GPU compute capability {self.compute_capability}" if self.compute_capability else "",
            f"TensorRT {self.tensorrt}" if self.tensorrt else "",
            f"CUDA {self.cuda}" if self.cuda else "",
            f"JetPack {self.jetpack}" if self.jetpack else f"L4T {self.l4t}" if self.l4t else "",
        ]
        head, *rest = [p for p in parts if p]
        return f"{head} ({', '.join(rest)})" if rest else head

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> DeviceTarget:
        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        sm = data.get("sm_count")
        return cls(
            device=text("device"),
            gpu=text("gpu"),
            compute_capability=text("compute_capability"),
            sm_count=int(sm) if isinstance(sm, int) and not isinstance(sm, bool) else None,
            tensorrt=text("tensorrt"),
            cuda=text("cuda"),
            l4t=text("l4t"),
            jetpack=text("jetpack"),
        )


def parse_nv_tegra_release(text: str) -> str | None:
    """`# R36 (release), REVISION: 4.4, ...` -> "36.4.4"; a trailing ".0" is dropped ("36.3")."""
    match = _RELEASE_RE.search(text)
    if match is None:
        return None
    parts = [match.group(1), *match.group(2).split(".")]
    while len(parts) > 2 and parts[-1] == "0":
        parts.pop()
    return ".".join(str(int(p)) for p in parts)


def jetpack_for_l4t(l4t: str | None) -> str | None:
    return JETPACK_FOR_L4T.get(l4t) if l4t else None


def detect_target(
    *, tegra_release: Path = NV_TEGRA_RELEASE, model_file: Path = DEVICE_TREE_MODEL
) -> DeviceTarget:
    """This device's facts; never raises (what cannot be read is None)."""
    from agent.backends.tensorrt import tensorrt_version
    from agent.backends.tensorrt.cuda import gpu_info

    l4t = parse_nv_tegra_release(_read(tegra_release) or "")
    model = (_read(model_file) or "").replace("\x00", "").strip() or None
    gpu = gpu_info()
    return DeviceTarget(
        device=model or (gpu.name if gpu else None),
        gpu=gpu.name if gpu else None,
        compute_capability=gpu.compute_capability if gpu else None,
        sm_count=gpu.sm_count if gpu else None,
        tensorrt=tensorrt_version(),
        cuda=gpu.cuda_driver if gpu else None,
        l4t=l4t,
        jetpack=jetpack_for_l4t(l4t),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _version_prefix(version: str, parts: int) -> str:
    return ".".join(version.split(".")[:parts])


def target_differences(expected: Mapping[str, Any], device: DeviceTarget) -> list[str]:
    """What differs between the target an engine was built for and this device, in words.

    Compared: GPU compute capability and SM count (the kernels TensorRT chose), TensorRT
    major.minor.patch (an engine runs only on the TensorRT that built it) and CUDA major.minor.
    The board name and the JetPack/L4T release are recorded for people but not compared: two
    boards with the same GPU run the same engine, and a JetPack update that keeps TensorRT and
    CUDA keeps engines working.
    """
    built = DeviceTarget.from_manifest(expected)
    found = []
    if built.compute_capability and built.compute_capability != device.compute_capability:
        found.append(
            f"GPU compute capability {built.compute_capability} vs "
            f"{device.compute_capability or 'none (no NVIDIA GPU found, or pycuda is missing)'}"
        )
    elif built.sm_count and device.sm_count and built.sm_count != device.sm_count:
        found.append(
            f"GPU with {built.sm_count} SMs vs {device.sm_count} SMs (another Orin module)"
        )
    if built.tensorrt:
        if device.tensorrt is None:
            found.append(
                f"engine built for TensorRT {_version_prefix(built.tensorrt, 3)}, this device has "
                "no TensorRT (its Python bindings do not import)"
            )
        elif _version_prefix(built.tensorrt, 3) != _version_prefix(device.tensorrt, 3):
            found.append(
                f"engine built for TensorRT {_version_prefix(built.tensorrt, 3)}, this device has "
                f"{_version_prefix(device.tensorrt, 3)}"
            )
    if (
        built.cuda
        and device.cuda
        and _version_prefix(built.cuda, 2) != _version_prefix(device.cuda, 2)
    ):
        found.append(f"engine built with CUDA {built.cuda}, this device has CUDA {device.cuda}")
    return found


def check_target(expected: Mapping[str, Any] | None, device: DeviceTarget, bundle: Path) -> None:
    """Refuse an engine bundle this device cannot run, before anything deserializes it.

    Raises BundleError `target_mismatch` (built for other hardware or another TensorRT), or
    `tensorrt_unavailable` (the right hardware, but TensorRT does not import here)."""
    if not expected:
        raise BundleError(
            "bad_manifest",
            f"bundle {bundle} holds a TensorRT engine but its manifest has no target; "
            "rebuild it with `edge-build compile`",
        )
    differences = target_differences(expected, device)
    if not differences:
        return
    built = DeviceTarget.from_manifest(expected)
    only_software_missing = (
        device.tensorrt is None and len(differences) == 1 and bool(device.compute_capability)
    )
    if only_software_missing:
        raise BundleError(
            "tensorrt_unavailable",
            f"bundle {bundle} holds a TensorRT engine ({built.describe()}), but TensorRT's Python "
            "bindings do not import on this device: `sudo apt install python3-libnvinfer` "
            "(JetPack 6.1/6.2 ship TensorRT 10.3) and create the agent's venv with "
            "--system-site-packages",
        )
    raise BundleError(
        "target_mismatch",
        f"bundle {bundle} holds a TensorRT engine built for {built.describe()}; this device "
        f"({device.describe()}) differs: {'; '.join(differences)}. Rebuild the engine on this "
        "device with `edge-build compile ONNX_BUNDLE --out DIR`, or run an ONNX bundle",
    )
