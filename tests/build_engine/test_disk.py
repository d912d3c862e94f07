"""The build and a small disk: a clear `disk_full` error before any work when the free space
cannot hold the export, the same code when the disk fills mid-way, and an export that consumes
its scratch copy as it writes the bundle (peak disk about one model, not two)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from build_engine.disk import disk_full_error, release_range
from build_engine.onnx_export import DATA_NAME, ONNX_NAME, _write_with_external_data
from tests.conftest import fill, mounted_tmpfs


def _external_graph(src: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Three 64 KiB weights in one external file with a table no tensor uses between them (how
    optimum writes a >2 GB model after we drop the duplicated embedding), plus a stray file."""
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((128, 128)).astype(np.float32) for i in range(3)}
    inits = []
    with (src / "model.onnx_data").open("wb") as data:
        for name, value in weights.items():
            if name == "w1":
                data.write(b"\xff" * 10000)  # the dropped table
            tensor = numpy_helper.from_array(value, name)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, field in (("location", "model.onnx_data"), ("offset", str(data.tell()))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, field
            entry = tensor.external_data.add()
            entry.key, entry.value = "length", str(data.write(value.tobytes()))
            inits.append(tensor)
    (src / "config.json").write_text("{}")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["b"]),
        helper.make_node("MatMul", ["b", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(src / ONNX_NAME))
    return model, weights


def test_source_is_consumed_as_the_bundle_is_written(tmp_path: Path) -> None:
    src, dst = tmp_path / "raw", tmp_path / "final"
    src.mkdir()
    dst.mkdir()
    model, weights = _external_graph(src)

    _write_with_external_data(model, src, dst / ONNX_NAME, DATA_NAME)

    assert sorted(p.name for p in src.iterdir()) == [ONNX_NAME]  # the weights file consumed
    written = onnx.load(str(dst / ONNX_NAME))  # loads model.onnx.data beside it
    for tensor in written.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])
    assert (dst / DATA_NAME).stat().st_size < 3 * 128 * 128 * 4 + 3 * 4096  # no dropped table


def test_released_bytes_give_their_blocks_back(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, no zero blocks
    with path.open("r+b") as f:
        os.fsync(f.fileno())
        blocks_before = os.fstat(f.fileno()).st_blocks
        if not release_range(f.fileno(), 100_000, 600_000):
            pytest.skip(f"{tmp_path} is on a filesystem without hole punching")
        blocks_after = os.fstat(f.fileno()).st_blocks
    content = path.read_bytes()
    assert len(content) == 1 << 20  # the size is kept
    assert content[:100_000] == (bytes(range(256)) * 4096)[:100_000]  # outside: untouched
    assert content[700_000:] == (bytes(range(256)) * 4096)[700_000:]
    assert content[100_000:700_000] == bytes(600_000)  # inside: zeros
    assert blocks_after * 512 <= blocks_before * 512 - 500_000  # and the disk got it back


def test_too_little_disk_is_refused_before_any_work(tmp_path: Path, tiny_dir: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "32m") as small:
        result = subprocess.run(
            [sys.executable, "-m", "build_engine", "export", "--model", str(tiny_dir),
             "--out", str(small / "bundle")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "[disk_full]" in result.stderr and "GiB free" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(small.iterdir()) == []  # no bundle, no scratch folder left behind


def test_a_disk_that_fills_up_is_a_coded_error(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "1m") as small:
        fill(small)
        with pytest.raises(OSError) as raised:
            (small / "more").write_bytes(b"x" * 65536)
        error = disk_full_error(raised.value, small / "bundle")
    assert error is not None and error.code == "disk_full"
    assert "filled up" in error.message and "nothing was written to --out" in error.message
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
