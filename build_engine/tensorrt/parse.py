"""Parse a bundle's model.onnx into a strongly typed TensorRT network, reporting every error.

Strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every tensor keeps the type the
ONNX graph gives it, so an fp16 graph builds in fp16 and a Q/DQ graph (int8, int4 weights) builds
exactly as quantized, without TensorRT's precision flags second-guessing it. `parse_from_file`
finds the external weights (model.onnx.data) next to the graph.
Python API: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.backends.tensorrt.seam import Shape
from build_engine.errors import BuildError


@dataclass(frozen=True)
class ParserProblem:
    """One `trt.ParserError`, as plain data."""

    node: int  # index of the ONNX node, -1 when the error is not about a node
    node_name: str
    operator: str
    description: str
    code: str


def format_parser_problems(onnx_path: Path, problems: Sequence[ParserProblem]) -> str:
    lines = [f"TensorRT's ONNX parser rejected {onnx_path} ({len(problems)} error(s)):"]
    for p in problems:
        where = f"node {p.node}" if p.node >= 0 else "graph"
        if p.node_name or p.operator:
            where += f" ({' '.join(x for x in (p.operator, p.node_name) if x)})"
        lines.append(f"  - {where}: {p.description} [{p.code}]")
    lines.append(
        "An operator TensorRT does not support usually means the bundle was exported for the CPU "
        "(ONNX Runtime-specific quantized operators): export it with `--target orin`"
    )
    return "\n".join(lines)


def parse_onnx(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser): the parser must outlive the network's weights, so both are returned."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = [_problem(parser.get_error(i)) for i in range(parser.num_errors)]
        if not problems:  # the parser failed before it could record an error of its own
            problems = [ParserProblem(-1, "", "", "; ".join(logger.errors) or "unknown", "")]
        raise BuildError("onnx_parse_failed", format_parser_problems(onnx_path, problems))
    return network, parser


def network_inputs(network: Any) -> dict[str, Shape]:
    """Each network input's shape as parsed (-1 for a dynamic dimension)."""
    inputs = (network.get_input(i) for i in range(network.num_inputs))
    return {tensor.name: tuple(int(d) for d in tensor.shape) for tensor in inputs}


def _problem(error: Any) -> ParserProblem:
    # node_name()/node_operator() exist in TensorRT 10; older bindings only have node().
    def call(method: str, default: Any) -> Any:
        fn = getattr(error, method, None)
        try:
            return fn() if fn is not None else default
        except Exception:  # a binding without the field raises instead of returning empty
            return default

    return ParserProblem(
        node=int(call("node", -1)),
        node_name=str(call("node_name", "")),
        operator=str(call("node_operator", "")),
        description=str(call("desc", error)),
        code=str(call("code", "")),
    )
