"""Export a loaded causal LM to one ONNX decoder graph with a KV cache.

The graph (optimum-onnx, task `text-generation-with-past`) is a single, un-merged decoder:

    in   input_ids, position_ids        int64  [batch, seq]
         attention_mask                 int64  [batch, past + seq]
         past_key_values.{i}.key/value  float  [batch, kv_heads, past, head_dim]
    out  logits                         float  [batch, seq, vocab]
         present.{i}.key/value          float  [batch, kv_heads, past + seq, head_dim]

Prefill passes past tensors with a sequence length of 0; there is no `use_cache_branch` input.

Weights always go to one external file, `model.onnx.data`, whatever the model size: the bundle
layout is then the same for a 135M test model and a 3B production model, the >2 GB protobuf limit
never applies, and the graph file stays small enough to inspect without loading weights.

optimum's own post-processing is always skipped (`no_post_process=True`): for a single decoder
graph it only de-duplicates tied weights, and it does so by loading the whole model into one
protobuf, which fails above 2 GB ("Failed to serialize proto"). We do that step ourselves on the
graph structure, streaming the weights, so the same code path serves every size and the tiny
test models exercise exactly what a 3B model goes through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.contract.bundle import ONNX_DATA_FILE, ONNX_MODEL_FILE
from build_engine.disk import release_range
from build_engine.errors import BuildError
from build_engine.grouped_attention import grouped_attention_for_export
from build_engine.model_source import SUPPORTED_MODEL_TYPES
from build_engine.shape_simplify import simplify_shapes

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from onnx.external_data_helper import ExternalDataInfo
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_NAME = ONNX_MODEL_FILE  # the bundle layout is the contract's (agent/contract/bundle.py)
DATA_NAME = ONNX_DATA_FILE
TASK = "text-generation-with-past"

# Initializers at least this big go to model.onnx.data; smaller ones (shape constants, scalars)
# stay inline where they cost nothing and keep the graph readable.
_EXTERNAL_THRESHOLD = 1024
# Each external tensor starts on a page boundary, which lets ONNX Runtime memory-map it instead
# of copying; the padding costs < 4 KiB per tensor.
_ALIGN = 4096
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote, and the graph's shape figures (read back from the graph)."""

    onnx_path: Path
    data_path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    kv_dtype: str
    tied_embeddings_deduplicated: bool
    export_seconds: float

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written, for the bundle's `files` table."""
        return (self.onnx_path, self.data_path)

    def arch(self) -> dict[str, int]:
        """The manifest's `arch` block."""
        return {
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden": self.hidden_size,
            "vocab": self.vocab_size,
            "max_seq_len": self.max_position_embeddings,
        }


def export_onnx(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    progress: Callable[[str], None],
    opset: int | None = None,
) -> ExportResult:
    """Export `model` into `out_dir` as exactly `model.onnx` + `model.onnx.data`.

    optimum writes into a scratch directory next to `out_dir` (same filesystem, so the final
    move is a rename) together with config/tokenizer files we do not want; only the two graph
    files are moved into `out_dir`. `tokenizer` is accepted for symmetry with the other build
    steps but not written: the bundle writer owns tokenizer files.

    Note: optimum sets `model.config.use_cache = True` and `return_dict = True` on the model.
    """
    del tokenizer  # see docstring: tokenizer files are the bundle writer's job
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(
            "unsupported_architecture",
            f"cannot export a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    started = time.perf_counter()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir.parent))
    try:
        raw_dir = scratch / "raw"
        final_dir = scratch / "final"
        final_dir.mkdir()
        progress(f"tracing {model_type} model with torch.onnx via optimum ({TASK})")
        _optimum_export(model, raw_dir, opset)

        import onnx

        progress("post-processing: de-duplicating tied embedding / lm_head")
        graph = onnx.load(str(raw_dir / ONNX_NAME), load_external_data=False)
        deduped = _tied(model) and _dedupe_tied_lm_head(graph, raw_dir)
        progress("post-processing: constant shapes for the exported view/reshape/expand arithmetic")
        removed = simplify_shapes(graph)
        progress(f"removed {removed} of {removed + len(graph.graph.node)} nodes")

        progress(f"saving {ONNX_NAME} + {DATA_NAME}")
        _write_with_external_data(graph, raw_dir, final_dir / ONNX_NAME, DATA_NAME)
        del graph
        shutil.rmtree(raw_dir)  # two full copies of a multi-GB model need not share the disk

        progress("checking the saved graph")
        try:
            onnx.checker.check_model(str(final_dir / ONNX_NAME))
        except onnx.checker.ValidationError as e:
            raise BuildError("export_failed", f"the exported graph is invalid: {e}") from e
        for name in (ONNX_NAME, DATA_NAME):
            os.replace(final_dir / name, out_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    return _describe(
        out_dir / ONNX_NAME,
        model,
        deduped=deduped,
        seconds=time.perf_counter() - started,
    )


def export_disk_bytes(model: PreTrainedModel) -> int:
    """Bytes the export holds on disk at its peak: every weight once in fp32, plus the transposed
    copy of a tied embedding that torch writes before we drop it."""
    import torch

    weights = 4 * sum(p.numel() for p in model.parameters())  # a tied table is counted once
    table = getattr(model.get_input_embeddings(), "weight", None)
    duplicate = 4 * table.numel() if _tied(model) and isinstance(table, torch.Tensor) else 0
    return int(weights + duplicate)


def _optimum_export(model: PreTrainedModel, raw_dir: Path, opset: int | None) -> None:
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with warnings.catch_warnings(), _torch_external_data_kept(), grouped_attention_for_export():
            # Tracing an HF model emits dozens of expected TracerWarnings ("converting a tensor
            # to a Python boolean...") that would bury the CLI's progress lines.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            onnx_export_from_model(
                model,
                raw_dir,
                task=TASK,
                opset=opset,
                device="cpu",
                no_post_process=True,
                # parity.check_parity is the real check (multi-step, KV cache); optimum's
                # validation would only cost another full ORT session.
                do_validation=False,
            )
    except BuildError:
        raise
    except Exception as e:  # translated at the boundary: exporter errors have many types
        raise BuildError("export_failed", f"optimum/torch.onnx export failed: {e}") from e
    if not (raw_dir / ONNX_NAME).is_file():
        raise BuildError("export_failed", f"optimum wrote no {ONNX_NAME} into {raw_dir}")


@contextlib.contextmanager
def _torch_external_data_kept() -> Iterator[None]:
    """Leave a >2 GB export as torch wrote it (one external file per tensor).

    optimum's `export_pytorch` otherwise merges those files into one: it loads every weight into
    one in-memory proto (while the caller still holds the torch model) and writes a second full
    copy before deleting the first. For a 3B model that is 12 GB more RAM and 12 GB more disk at
    the peak, for a merge `_write_with_external_data` does anyway, streaming and deleting each
    file as it goes. optimum decides with `check_model_uses_external_data`; answering False keeps
    torch's files. If a later optimum drops that name, the merge simply happens as before.
    """
    from optimum.exporters.onnx import convert

    if not hasattr(convert, "check_model_uses_external_data"):
        yield
        return
    original = convert.check_model_uses_external_data
    convert.check_model_uses_external_data = lambda _model: False
    try:
        yield
    finally:
        convert.check_model_uses_external_data = original


def _tied(model: PreTrainedModel) -> bool:
    """Whether lm_head and the embedding share storage, i.e. the export holds a duplicate."""
    import torch

    out_w = getattr(model.get_output_embeddings(), "weight", None)  # type: ignore[no-untyped-call]
    inp_w = getattr(model.get_input_embeddings(), "weight", None)
    return (
        isinstance(out_w, torch.Tensor)
        and isinstance(inp_w, torch.Tensor)
        and out_w.data_ptr() == inp_w.data_ptr()
    )


def _dedupe_tied_lm_head(graph: onnx.ModelProto, src_dir: Path) -> bool:
    """Store a tied embedding/lm_head table once, in the lm_head's [hidden, vocab] layout.

    The TorchScript exporter writes a tied weight twice: [vocab, hidden] for the embedding Gather
    and a transposed copy for the lm_head MatMul. We keep the MatMul's copy and let the lookup
    read it along axis 1 (`Gather(W, ids, axis=1)` gives [hidden, batch, seq]; a Transpose of
    that small activation restores [batch, seq, hidden]). Unlike optimum's fix, which feeds the
    MatMul through a Transpose of the table, no weight-sized Transpose is left for ONNX Runtime or
    TensorRT to constant-fold, so the table is stored once on disk *and* in memory.

    Only the exact pattern below is rewritten, and only when the bytes prove one table is the
    transpose of the other; anything else is left alone (a bigger file, never a wrong one).
    """
    import numpy as np
    import onnx

    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    ids = next((i for i in g.input if i.name == "input_ids"), None)
    if ids is None or len(ids.type.tensor_type.shape.dim) != 2:
        return False
    gather = next(
        (
            n
            for n in g.node
            if n.op_type == "Gather"
            and len(n.input) == 2
            and n.input[1] == ids.name
            and n.input[0] in inits
        ),
        None,
    )
    matmul = next((n for n in g.node if n.op_type == "MatMul" and "logits" in n.output), None)
    if gather is None or matmul is None or matmul.input[1] not in inits:
        return False
    if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        return False
    emb, head = inits[gather.input[0]], inits[matmul.input[1]]

    def users(name: str) -> int:
        return sum(1 for n in g.node for i in n.input if i == name)

    if (
        users(emb.name) != 1
        or users(head.name) != 1
        or emb.data_type != head.data_type
        or len(emb.dims) != 2
        or list(head.dims) != list(reversed(emb.dims))
    ):
        return False
    if not np.array_equal(_tensor_array(head, src_dir), _tensor_array(emb, src_dir).T):
        return False

    hidden_first = f"{gather.output[0]}_hidden_first"
    lookup = [
        onnx.helper.make_node(
            "Gather", [head.name, ids.name], [hidden_first], name=gather.name, axis=1
        ),
        onnx.helper.make_node(
            "Transpose",
            [hidden_first],
            list(gather.output),
            name=f"{gather.name}_to_batch_first",
            perm=[1, 2, 0],
        ),
    ]
    at = list(g.node).index(gather)
    g.node.remove(gather)
    for offset, node in enumerate(lookup):
        g.node.insert(at + offset, node)
    g.initializer.remove(emb)
    return True


def _tensor_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray[Any, Any]:
    """The tensor's values, memory-mapped when external so a GB-sized table is not copied."""
    import numpy as np
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(
        base_dir / info.location,
        dtype=dtype,
        mode="r",
        offset=info.offset or 0,
        shape=tuple(tensor.dims),
    )


def _write_with_external_data(
    graph: onnx.ModelProto, src_dir: Path, dst_onnx: Path, data_name: str
) -> None:
    """Save `graph` with every large initializer in one aligned external file, streaming bytes.

    Source tensors may be inline (`raw_data`) or in optimum's external file(s); either way each is
    copied chunk-wise, so peak memory is one chunk, not the model. Tensors in node attributes
    (Constant values) are brought inline: they are small and some tools mishandle external ones.

    Disk: the source is consumed as the output grows, so the copy needs about one model's worth
    of free disk, not two (for a 3B model, 12 GB less on a device's eMMC). Bytes no tensor refers
    to any more (the de-duplicated embedding) are released before copying starts, each tensor's
    bytes right after it is copied, and a source file once nothing in it is needed; see
    `_SourceFiles`.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = list(_initializers(graph.graph)) + list(_attribute_tensors(graph.graph))
    readers = _SourceFiles(
        src_dir,
        [ExternalDataInfo(t) for t in tensors if uses_external_data(t)],
        keep={dst_onnx.name, ONNX_NAME},
    )
    with readers, (dst_onnx.parent / data_name).open("wb") as out:
        for tensor in _initializers(graph.graph):
            inline = tensor.HasField("raw_data")
            if not uses_external_data(tensor) and (
                not inline or len(tensor.raw_data) < _EXTERNAL_THRESHOLD
            ):
                continue
            offset = -(-out.tell() // _ALIGN) * _ALIGN
            out.write(b"\0" * (offset - out.tell()))
            if uses_external_data(tensor):
                for chunk in readers.read(tensor):
                    out.write(chunk)
            else:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            _set_external(tensor, data_name, offset, out.tell() - offset)

        for tensor in _attribute_tensors(graph.graph):
            if uses_external_data(tensor):
                tensor.raw_data = b"".join(readers.read(tensor))
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT

    onnx.save(graph, str(dst_onnx))


class _SourceFiles:
    """optimum's external-data files, read chunk-wise and released as soon as nothing needs them.

    optimum writes a large model as one `model.onnx_data`; deleting it only at the end would
    hold two full copies on disk at once. Instead each copied tensor's byte range is released
    with `release_range` (a hole punched in the file; the filesystem frees those blocks), so the
    scratch file shrinks while `model.onnx.data` grows. A file is deleted once every tensor in it
    is copied; files no tensor refers to are deleted at the start. Only a scratch directory may
    be given: its files are consumed.
    """

    def __init__(self, src_dir: Path, tensors: list[ExternalDataInfo], keep: set[str]) -> None:
        self._dir = src_dir
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        for info in tensors:
            self._ranges.setdefault(info.location, []).append(
                (int(info.offset or 0), int(info.length or 0))
            )
        self._pending = {location: len(ranges) for location, ranges in self._ranges.items()}
        self._open: dict[str, BinaryIO] = {}
        self._keep = keep

    def __enter__(self) -> _SourceFiles:
        for path in self._dir.iterdir():
            if path.is_file() and path.name not in self._ranges and path.name not in self._keep:
                path.unlink()
        for location, ranges in self._ranges.items():
            if any(length == 0 for _, length in ranges):
                continue  # a tensor reaching to the end of its file: no gap is known for sure
            f = self._file(location)
            position = 0
            for offset, length in sorted(ranges):  # release the gaps: bytes no tensor uses
                release_range(f.fileno(), position, offset - position)
                position = max(position, offset + length)
            release_range(f.fileno(), position, os.fstat(f.fileno()).st_size - position)
        return self

    def __exit__(self, *_exc: object) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def read(self, tensor: onnx.TensorProto) -> Iterator[bytes]:
        from onnx.external_data_helper import ExternalDataInfo

        info = ExternalDataInfo(tensor)
        f = self._file(info.location)
        start = int(info.offset or 0)
        f.seek(start)
        remaining = info.length if info.length is not None else -1
        while remaining != 0:
            chunk = f.read(_COPY_CHUNK if remaining < 0 else min(_COPY_CHUNK, remaining))
            if not chunk:
                if remaining > 0:
                    raise BuildError(
                        "export_failed", f"external data of {tensor.name} is truncated"
                    )
                break
            remaining -= len(chunk) if remaining > 0 else 0
            yield chunk
        self._done_with(info.location, start, f.tell() - start)

    def _file(self, location: str) -> BinaryIO:
        f = self._open.get(location)
        if f is None:
            # r+b: punching a hole needs a file descriptor open for writing
            f = self._open[location] = (self._dir / location).open("r+b")
        return f

    def _done_with(self, location: str, offset: int, length: int) -> None:
        self._pending[location] -= 1
        if self._pending[location] == 0:
            self._open.pop(location).close()
            (self._dir / location).unlink()
        else:
            release_range(self._open[location].fileno(), offset, length)


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    import onnx

    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from _initializers(sub)


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
    for sub in _subgraphs(graph):
        yield from _attribute_tensors(sub)


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _describe(
    onnx_path: Path, model: PreTrainedModel, *, deduped: bool, seconds: float
) -> ExportResult:
    """Read the figures back from the saved graph, cross-checked against the model config."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    inputs = {i.name: i for i in graph.graph.input}
    outputs = {o.name: o for o in graph.graph.output}
    past_keys = sorted(
        (n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
        key=lambda n: int(n.split(".")[1]),
    )
    required = {"input_ids", "attention_mask", "position_ids", "logits"}
    if not past_keys or not required <= (inputs.keys() | outputs.keys()):
        raise BuildError(
            "export_failed",
            f"unexpected graph interface: inputs {list(inputs)}, outputs {list(outputs)}",
        )

    def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    _, kv_heads, _, head_dim = dims(inputs[past_keys[0]])
    vocab = dims(outputs["logits"])[-1]
    if not all(isinstance(x, int) and x > 0 for x in (kv_heads, head_dim, vocab)):
        raise BuildError("export_failed", "KV-cache/logits dimensions are not static in the graph")
    cfg = model.config
    if len(past_keys) != cfg.num_hidden_layers:
        raise BuildError(
            "export_failed",
            f"graph has {len(past_keys)} KV layers but the model has {cfg.num_hidden_layers}",
        )
    kv_elem = inputs[past_keys[0]].type.tensor_type.elem_type
    opset = next(
        (o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        0,
    )
    return ExportResult(
        onnx_path=onnx_path,
        data_path=onnx_path.parent / DATA_NAME,
        opset=opset,
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        num_layers=len(past_keys),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(vocab),
        max_position_embeddings=int(cfg.max_position_embeddings),
        kv_dtype=str(onnx.helper.tensor_dtype_to_np_dtype(kv_elem)),
        tied_embeddings_deduplicated=deduped,
        export_seconds=round(seconds, 3),
    )
