"""What every quantization path shares: precisions, saving, graph facts, calibration.

This is the leaf of the package: it imports no other quantize module (`dispatch` picks the cpu or
orin path, and those build on this). `cpu` graphs may use ONNX Runtime's contrib ops; `orin`
graphs must hold standard ONNX ops only, so `contrib_ops()` is the check the orin paths (and the
tests) run on every graph they write.

Every path works on an in-memory `onnx.ModelProto` with the weights loaded and writes it with
`save_model` into a staging directory: exactly `model.onnx` + `model.onnx.data`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.contract.bundle import ONNX_DATA_FILE, ONNX_MODEL_FILE
from build_engine.errors import BuildError

if TYPE_CHECKING:
    import onnx

Precision = Literal["fp32", "fp16", "int8", "int4"]
Target = Literal["cpu", "orin"]
Progress = Callable[[str], None]

ONNX_NAME = ONNX_MODEL_FILE  # the bundle layout is the contract's (agent/contract/bundle.py)
DATA_NAME = ONNX_DATA_FILE

# Initializers at least this big go to model.onnx.data, each on a page boundary so ONNX Runtime can
# memory-map it (the same layout as the fp32 export writes).
_EXTERNAL_THRESHOLD = 1024
_ALIGN = 4096
_STANDARD_DOMAINS = ("", "ai.onnx")


# --- loading and saving --------------------------------------------------------------------------


def load_model(path: Path) -> onnx.ModelProto:
    """The graph with every external weight read in (quantizers need the values)."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model(model: onnx.ModelProto, out_dir: Path) -> Path:
    """Write `model` as `out_dir/model.onnx` + `out_dir/model.onnx.data`; return the graph path.

    Every initializer of at least 1 KiB (subgraphs too) goes to the data file, page-aligned; the
    tensors' bytes are moved, not copied, so peak memory stays one model. Small tensors and
    Constant node values stay inline.
    """
    import onnx
    from onnx import numpy_helper

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / DATA_NAME).open("wb") as data:
        for tensor in _initializers(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise BuildError("quantize_failed", f"{tensor.name} was never loaded into memory")
            if not tensor.HasField("raw_data"):
                if _typed_size(tensor) < _EXTERNAL_THRESHOLD:
                    continue
                # Typed fields (float_data, int32_data, ...): re-encode as raw bytes.
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            if len(tensor.raw_data) < _EXTERNAL_THRESHOLD:
                continue
            offset = -(-data.tell() // _ALIGN) * _ALIGN
            data.write(b"\0" * (offset - data.tell()))
            data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", DATA_NAME),
                ("offset", str(offset)),
                ("length", str(data.tell() - offset)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(model, str(out_dir / ONNX_NAME))
    return out_dir / ONNX_NAME


def _typed_size(tensor: onnx.TensorProto) -> int:
    fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    return 4 * sum(len(getattr(tensor, f)) for f in fields)


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


# --- graph facts ---------------------------------------------------------------------------------


def contrib_ops(model: onnx.ModelProto) -> list[str]:
    """Every node (subgraphs included) outside the standard ONNX domain, as `domain::Op (name)`.

    TensorRT's ONNX parser knows only standard ops (plus its own plugins), so an orin graph must
    give `[]` here; the CPU graphs are expected to hold com.microsoft ops.
    """
    found: list[str] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in _STANDARD_DOMAINS:
                found.append(f"{node.domain}::{node.op_type} ({node.name})")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)


def set_opset_version(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in _STANDARD_DOMAINS:
            entry.version = version


@dataclass(frozen=True)
class TiedHead:
    """Where the logits come from, and whether the embedding lookup reads the same table.

    The export stores a tied table once in the lm_head's [hidden, vocab] layout and looks tokens up
    with `Gather(W, ids, axis=1)`; older exports (and optimum's own dedupe) instead feed the
    MatMul through a Transpose of a [vocab, hidden] table. `gather` is the embedding Gather when it
    reads the lm_head's weight (directly or through that Transpose), else None.
    """

    matmul: str  # lm_head MatMul node name
    weight: str  # its B input (an initializer, or a Transpose output)
    gather: str | None
    table: str | None  # the initializer both read, when tied


def find_lm_head(model: onnx.ModelProto) -> TiedHead:
    """The MatMul that produces `logits` and, when the table is shared, the embedding Gather."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    node = producers.get("logits")
    # logits may sit behind a Cast (fp16 graphs) or an Identity; walk back to the MatMul.
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise BuildError("quantize_failed", "cannot find the lm_head MatMul that produces logits")
    weight = node.input[1]
    table: str | None = weight if weight in inits else None
    source = producers.get(weight)
    if table is None and source is not None and source.op_type == "Transpose":
        table = source.input[0] if source.input[0] in inits else None
    gather = None
    if table is not None:
        for cand in graph.node:
            if cand.op_type == "Gather" and cand.input[0] in (table, weight):
                gather = cand.name
                break
    return TiedHead(matmul=node.name, weight=weight, gather=gather, table=table)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Every tensor name -> the nodes that read it (a node reading it twice is listed twice)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls whose B input is a 2-D initializer (the linear layers)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


# --- calibration ---------------------------------------------------------------------------------


class CalibrationFeeds:
    """ONNX Runtime calibration feeds for the fp32 decoder, built from real token sequences.

    Each sequence gives two samples shaped like real serving: a multi-token prefill chunk over a
    non-empty past, and a single-token decode step. The past is the fp32 graph's own KV cache over
    the first part of the sequence, so the attention inputs see realistic values; a prefill with
    an empty (length-0) past is never fed, because zero-size tensors give no or broken statistics.
    Feeds are produced lazily, one sequence at a time, so memory stays one sample.

    Implements onnxruntime's `CalibrationDataReader` protocol (`get_next`, returning None at the
    end); `rewind()` starts over for a second pass.
    """

    def __init__(
        self,
        fp32_onnx: Path,
        sequences: Sequence[Sequence[int]],
        *,
        min_tokens: int = 8,
        threads: int = 0,
        with_first_prefill: bool = False,
    ) -> None:
        import onnxruntime as ort

        self._sequences = [list(s) for s in sequences if len(s) >= min_tokens]
        if not self._sequences:
            raise BuildError(
                "no_calibration",
                f"calibration needs token sequences of at least {min_tokens} tokens",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(fp32_onnx), options, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self._session.get_inputs()}
        self._pasts = [n for n in inputs if n.startswith("past_key_values.")]
        if not self._pasts:
            raise BuildError("quantize_failed", f"{fp32_onnx} has no past_key_values inputs")
        shape = inputs[self._pasts[0]].shape
        self._kv_heads, self._head_dim = int(shape[1]), int(shape[3])
        self._has_positions = "position_ids" in inputs
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._pending: list[dict[str, np.ndarray[Any, Any]]] = []
        self._next_sequence = 0
        self._with_first_prefill = with_first_prefill

    def __len__(self) -> int:
        return 2 * len(self._sequences)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        while not self._pending:
            if self._next_sequence >= len(self._sequences):
                return None
            self._pending = self._samples(self._sequences[self._next_sequence])
            self._next_sequence += 1
        return self._pending.pop(0)

    def rewind(self) -> None:
        self._pending = []
        self._next_sequence = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
        self.rewind()
        while (feed := self.get_next()) is not None:
            yield feed

    def _samples(self, ids: list[int]) -> list[dict[str, np.ndarray[Any, Any]]]:
        past_len = max(1, len(ids) // 2)
        empty = np.zeros((1, self._kv_heads, 0, self._head_dim), np.float32)
        past = {name: empty for name in self._pasts}
        first = self._feed(ids[:past_len], 0, past)
        past = self._run(first)
        chunk = self._feed(ids[past_len:-1], past_len, past)
        past = self._run(chunk)
        decode = self._feed(ids[-1:], len(ids) - 1, past)
        return [first, chunk, decode] if self._with_first_prefill else [chunk, decode]

    def _feed(
        self, ids: list[int], start: int, past: dict[str, np.ndarray[Any, Any]]
    ) -> dict[str, np.ndarray[Any, Any]]:
        n = len(ids)
        feed: dict[str, np.ndarray[Any, Any]] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
        }
        if self._has_positions:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        feed.update(past)
        return feed

    def _run(self, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        results = dict(zip(self._outputs, self._session.run(None, feed), strict=True))
        return {name: results[name.replace("past_key_values.", "present.")] for name in self._pasts}
