"""Device detection and the engine-compatibility decision, and the runtime's backend choice.

Nothing here needs a GPU: `/etc/nv_tegra_release` and the device-tree model are read from files
the tests write, and the decision is made on `DeviceTarget` values. The runtime tests use an
engine bundle whose engine.plan is not an engine at all, which proves the target is checked
before anything tries to deserialize it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.backends.tensorrt import tensorrt_version
from agent.bundle import MANIFEST_NAME, file_table
from agent.config import AgentConfig, RuntimeConfig, validate
from agent.contract.bundle import ENGINE_FILE
from agent.errors import BundleError
from agent.runtime import load_model
from agent.target import (
    DeviceTarget,
    check_target,
    detect_target,
    jetpack_for_l4t,
    parse_nv_tegra_release,
    target_differences,
)

# The first line is real, from an AGX Orin on JetPack 6.2.1; JetPack 6 adds lines like these.
R36_4_4 = (
    "# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, "
    "DATE: Mon Jun 16 16:07:13 UTC 2025\n"
    "# KERNEL_VARIANT: oot\n"
    "TARGET_USERSPACE_LIB_DIR=nvidia\n"
    "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
)


def release_line(major: int, revision: str, gcid: int, board: str, date: str) -> str:
    """A first line in the same format for the other releases (GCIDs and dates illustrative)."""
    return (
        f"# R{major} (release), REVISION: {revision}, GCID: {gcid}, BOARD: {board}, "
        f"EABI: aarch64, DATE: {date}\n"
    )


R36_3 = release_line(36, "3.0", 36191598, "generic", "Mon May  6 17:34:21 UTC 2024")
R36_4 = release_line(36, "4.0", 37537400, "generic", "Fri Sep 13 04:36:44 UTC 2024")
R36_4_3 = release_line(36, "4.3", 38968081, "generic", "Wed Jan  8 01:49:37 UTC 2025")
R35_4_1 = release_line(35, "4.1", 33958178, "t186ref", "Tue Aug  1 19:57:35 UTC 2023")

ORIN = DeviceTarget(
    device="NVIDIA Jetson AGX Orin Developer Kit",
    gpu="Orin",
    compute_capability="8.7",
    sm_count=16,
    tensorrt="10.3.0.30",
    cuda="12.6",
    l4t="36.4.4",
    jetpack="6.2.1",
)


@pytest.mark.parametrize(
    ("text", "l4t", "jetpack"),
    [
        (R36_4_4, "36.4.4", "6.2.1"),
        (R36_4_3, "36.4.3", "6.2"),
        (R36_4, "36.4", "6.1"),
        (R36_3, "36.3", "6.0"),
        (R35_4_1, "35.4.1", None),  # JetPack 5: TensorRT 8, no engines of ours
    ],
)
def test_nv_tegra_release_to_l4t_and_jetpack(text: str, l4t: str, jetpack: str | None) -> None:
    assert parse_nv_tegra_release(text) == l4t
    assert jetpack_for_l4t(l4t) == jetpack


def test_unreadable_release_text() -> None:
    assert parse_nv_tegra_release("") is None
    assert parse_nv_tegra_release("Ubuntu 22.04.4 LTS") is None
    assert jetpack_for_l4t(None) is None


def test_detect_target_reads_the_jetson_files(tmp_path: Path) -> None:
    (tmp_path / "nv_tegra_release").write_text(R36_4_4)
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    target = detect_target(
        tegra_release=tmp_path / "nv_tegra_release", model_file=tmp_path / "model"
    )
    assert target.l4t == "36.4.4" and target.jetpack == "6.2.1"
    assert target.device == "NVIDIA Jetson AGX Orin Developer Kit"
    assert target.tensorrt == tensorrt_version()


def test_detect_target_off_a_jetson(tmp_path: Path) -> None:
    target = detect_target(tegra_release=tmp_path / "absent", model_file=tmp_path / "absent")
    assert target.l4t is None and target.jetpack is None
    if target.compute_capability is None:  # this CPU machine: nothing GPU-related is known
        assert target.gpu is None and target.cuda is None and target.sm_count is None


def test_same_target_has_no_differences() -> None:
    assert target_differences(ORIN.to_manifest(), ORIN) == []
    # Another TensorRT build number of the same release, another board name, another JetPack
    # with the same TensorRT and CUDA: the engine still runs.
    other = DeviceTarget(**{**ORIN.to_manifest(), "tensorrt": "10.3.0.26", "device": "Orin 64GB",
                            "l4t": "36.4.3", "jetpack": "6.2"})  # fmt: skip
    assert target_differences(ORIN.to_manifest(), other) == []


def test_differences_are_said_in_words() -> None:
    device = DeviceTarget(**{**ORIN.to_manifest(), "tensorrt": "10.7.0.23",
                             "compute_capability": "8.6", "cuda": "12.8"})  # fmt: skip
    assert target_differences(ORIN.to_manifest(), device) == [
        "GPU compute capability 8.7 vs 8.6",
        "engine built for TensorRT 10.3.0, this device has 10.7.0",
        "engine built with CUDA 12.6, this device has CUDA 12.8",
    ]
    orin_nx = DeviceTarget(**{**ORIN.to_manifest(), "sm_count": 8})
    assert target_differences(ORIN.to_manifest(), orin_nx) == [
        "GPU with 16 SMs vs 8 SMs (another Orin module)"
    ]


def test_mismatch_is_refused_with_what_differs(tmp_path: Path) -> None:
    device = DeviceTarget(**{**ORIN.to_manifest(), "tensorrt": "10.7.0.23"})
    with pytest.raises(BundleError) as info:
        check_target(ORIN.to_manifest(), device, tmp_path)
    assert info.value.code == "target_mismatch"
    assert "engine built for TensorRT 10.3.0, this device has 10.7.0" in info.value.message
    assert "edge-build compile" in info.value.message
    check_target(ORIN.to_manifest(), ORIN, tmp_path)  # the right device: no error


def test_a_machine_without_a_gpu_is_a_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        check_target(ORIN.to_manifest(), DeviceTarget(), tmp_path)
    assert info.value.code == "target_mismatch"
    assert "GPU compute capability 8.7 vs none" in info.value.message
    assert "this device has no TensorRT" in info.value.message


def test_the_right_gpu_without_tensorrt_says_how_to_install_it(tmp_path: Path) -> None:
    device = DeviceTarget(**{**ORIN.to_manifest(), "tensorrt": None})
    with pytest.raises(BundleError) as info:
        check_target(ORIN.to_manifest(), device, tmp_path)
    assert info.value.code == "tensorrt_unavailable"
    assert "python3-libnvinfer" in info.value.message


def test_an_engine_bundle_without_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        check_target(None, ORIN, tmp_path)
    assert info.value.code == "bad_manifest"


# --- the runtime's choice ---------------------------------------------------------------------


def engine_bundle(onnx_bundle: Path, root: Path, target: dict[str, object] | None) -> Path:
    """A bundle laid out like `edge-build compile`'s, but engine.plan is NOT an engine."""
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "golden.json"):
        if (onnx_bundle / name).is_file():
            shutil.copy2(onnx_bundle / name, root / name)
    (root / ENGINE_FILE).write_bytes(b"not a TensorRT engine")
    manifest = json.loads((onnx_bundle / MANIFEST_NAME).read_text())
    manifest.update(backend="tensorrt", target=target, files=file_table(root))
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_runtime_checks_the_target_before_deserializing(
    default_bundle: Path, tmp_path: Path
) -> None:
    built_for = {**ORIN.to_manifest(), "compute_capability": "9.9"}  # no such device here
    bundle = engine_bundle(default_bundle, tmp_path / "engine", built_for)
    with pytest.raises(BundleError) as info:
        load_model(bundle)
    assert info.value.code == "target_mismatch"
    assert "GPU compute capability 9.9 vs" in info.value.message


def test_runtime_backend_setting_must_fit_the_bundle(default_bundle: Path, tmp_path: Path) -> None:
    bundle = engine_bundle(default_bundle, tmp_path / "engine", ORIN.to_manifest())
    with pytest.raises(BundleError) as info:
        load_model(bundle, RuntimeConfig(backend="onnxruntime"))
    assert info.value.code == "unsupported_backend"
    with pytest.raises(BundleError) as info:
        load_model(default_bundle, RuntimeConfig(backend="tensorrt"))
    assert info.value.code == "unsupported_backend"
    assert "edge-build compile" in info.value.message


def test_config_accepts_the_tensorrt_backend() -> None:
    config = AgentConfig(device_id="d", runtime=RuntimeConfig(backend="tensorrt"))
    assert validate(config).runtime.backend == "tensorrt"
