"""`edge-build compile`: its refusals and limits here; the real compile on a Jetson (`gpu`).

Without TensorRT the command must fail with a BuildError that says TensorRT is needed and where
to run it, never with a traceback. Nothing here imitates TensorRT.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from agent.backends.tensorrt import tensorrt_version
from agent.bundle import MANIFEST_NAME, file_table, open_bundle
from agent.canary import read_golden
from build_engine import cli
from build_engine.compile import (
    CompileOptions,
    add_compile_arguments,
    compile_bundle,
    compile_from_args,
    open_source_bundle,
    resolve_limits,
)
from build_engine.errors import BuildError
from build_engine.tensorrt.parse import ParserProblem, format_parser_problems

no_tensorrt_here = pytest.mark.skipif(
    tensorrt_version() is not None, reason="TensorRT is installed: the refusal cannot happen here"
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-build compile")
    add_compile_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_and_their_defaults(tmp_path: Path) -> None:
    args = parse(str(tmp_path / "onnx"), "--out", str(tmp_path / "engine"))
    assert (args.max_batch, args.max_prefill, args.max_context) == (4, 512, 0)
    assert (args.workspace_gb, args.opt_level, args.timing_cache) == (4.0, 3, None)
    assert not args.force and not args.json
    args = parse(str(tmp_path / "onnx"), "--out", "x", "--max-batch", "8", "--max-prefill", "256",
                 "--max-context", "2048", "--workspace-gb", "6", "--opt-level", "5",
                 "--timing-cache", "/var/cache/trt.cache", "--force")  # fmt: skip
    assert (args.max_batch, args.max_prefill, args.max_context, args.opt_level) == (8, 256, 2048, 5)
    assert args.timing_cache == Path("/var/cache/trt.cache") and args.force
    with pytest.raises(SystemExit):
        parse("b", "--out", "x", "--opt-level", "6")


@no_tensorrt_here
def test_without_tensorrt_compile_says_what_is_needed(orin_reference: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        compile_bundle(orin_reference, tmp_path / "engine", CompileOptions(), progress=print)
    assert info.value.code == "tensorrt_missing"
    assert "python3-libnvinfer" in info.value.message and "Jetson" in info.value.message
    assert "--system-site-packages" in info.value.message
    assert not (tmp_path / "engine").exists()


@no_tensorrt_here
def test_compile_from_args_without_tensorrt(orin_reference: Path, tmp_path: Path) -> None:
    args = parse(str(orin_reference), "--out", str(tmp_path / "engine"))
    with pytest.raises(BuildError, match="needs TensorRT and an NVIDIA GPU"):
        compile_from_args(args, progress=print)


@no_tensorrt_here
def test_edge_build_compile_exits_2_without_a_traceback(
    orin_reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verbs = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    if "compile" not in verbs.choices:
        pytest.skip("`edge-build compile` is not wired into build_engine/cli.py yet")
    code = cli.main(["compile", str(orin_reference), "--out", str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 2
    assert "[tensorrt_missing]" in err and "Traceback" not in err


def test_limits_come_from_the_bundle_and_the_flags(orin_reference: Path) -> None:
    manifest = open_bundle(orin_reference).manifest
    assert manifest.arch.max_seq_len == 8192
    defaults = resolve_limits(manifest, CompileOptions())
    assert (defaults.max_batch, defaults.max_prefill, defaults.max_context) == (4, 512, 4096)
    small = resolve_limits(manifest, CompileOptions(max_batch=1, max_prefill=1024, max_context=300))
    assert (small.max_batch, small.max_prefill, small.max_context) == (1, 300, 300)
    with pytest.raises(BuildError, match="exceeds the model's context"):
        resolve_limits(manifest, CompileOptions(max_context=10000))
    with pytest.raises(BuildError, match="max batch 0 must be at least 1") as info:
        resolve_limits(manifest, CompileOptions(max_batch=0))
    assert info.value.code == "bad_limits"


def copy_with_manifest(bundle: Path, root: Path, **changes: object) -> Path:
    shutil.copytree(bundle, root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest.update(changes)
    manifest["files"] = file_table(root)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_only_onnx_bundles_made_for_tensorrt_are_compiled(
    orin_reference: Path, default_bundle: Path, tmp_path: Path
) -> None:
    assert open_source_bundle(orin_reference).manifest.precision == "fp32"
    with pytest.raises(BuildError, match="exported for the cpu") as info:
        open_source_bundle(default_bundle)  # fp32 too, but ONNX Runtime's CPU graph
    assert info.value.code == "wrong_target"
    cpu_int8 = copy_with_manifest(orin_reference, tmp_path / "int8", precision="int8",
                                  build={"target": "cpu"})  # fmt: skip
    with pytest.raises(BuildError, match="--target orin --precision int8") as info:
        open_source_bundle(cpu_int8)
    assert info.value.code == "wrong_target"
    engine = copy_with_manifest(orin_reference, tmp_path / "engine", backend="tensorrt")
    with pytest.raises(BuildError, match="is a tensorrt bundle"):
        open_source_bundle(engine)
    with pytest.raises(BuildError) as info:
        open_source_bundle(tmp_path / "absent")
    assert info.value.code == "bad_bundle"


def test_every_parser_error_is_reported(tmp_path: Path) -> None:
    message = format_parser_problems(
        tmp_path / "model.onnx",
        [
            ParserProblem(12, "/model/layers.0/mlp/MatMulNBits", "MatMulNBits",
                          "No importer registered for op: MatMulNBits", "UNSUPPORTED_NODE"),
            ParserProblem(40, "/model/layers.1/mlp/MatMulNBits", "MatMulNBits",
                          "No importer registered for op: MatMulNBits", "UNSUPPORTED_NODE"),
            ParserProblem(-1, "", "", "model has no opset import", "INVALID_GRAPH"),
        ],
    )  # fmt: skip
    lines = message.splitlines()
    assert "(3 error(s))" in lines[0]
    assert lines[1] == (
        "  - node 12 (MatMulNBits /model/layers.0/mlp/MatMulNBits): No importer registered for "
        "op: MatMulNBits [UNSUPPORTED_NODE]"
    )
    assert lines[2].startswith("  - node 40 ") and lines[3].startswith("  - graph: model has no")
    assert "--target orin" in lines[-1]


# --- on a Jetson ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_compile_the_orin_reference_and_replay_its_golden(
    orin_reference: Path, tmp_path: Path
) -> None:
    pytest.importorskip(
        "tensorrt", reason="needs TensorRT and an NVIDIA GPU (Jetson); not available on this CPU "
        "machine"
    )  # fmt: skip
    from agent.canary import check_golden
    from agent.runtime import load_model

    lines: list[str] = []
    out = tmp_path / "engines" / "smollm2-135m-trt"
    options = CompileOptions(max_batch=2, max_prefill=128, max_context=512, opt_level=1)
    manifest = compile_bundle(orin_reference, out, options, progress=lines.append)

    bundle = open_bundle(out)  # every file hashed
    assert set(bundle.manifest.files) >= {"engine.plan", "tokenizer.json", "golden.json"}
    assert "model.onnx" not in bundle.manifest.files
    assert manifest["backend"] == "tensorrt" and manifest["arch"]["max_seq_len"] == 512
    target = manifest["target"]
    assert target["compute_capability"] and target["tensorrt"] and target["cuda"]
    assert json.loads((out / "golden.json").read_text())["backend"] == "tensorrt"
    assert len(read_golden(out)) == len(read_golden(orin_reference))
    assert (out.parent / "tensorrt-timing.cache").stat().st_size > 0

    model = load_model(out)  # target check, deserialize, TensorRT backend
    try:
        assert model.backend.info.name == "tensorrt"
        assert check_golden(out, model.backend, model.codec) == []
    finally:
        model.backend.close()

    again: list[str] = []
    compile_bundle(orin_reference, out, CompileOptions(max_batch=2, max_prefill=128,
                   max_context=512, opt_level=1, force=True), progress=again.append)  # fmt: skip
    assert any("reusing the timing cache" in line for line in again)
