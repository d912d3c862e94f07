"""ONNX Runtime backend: runs the bundle's `model.onnx` (optimum's decoder with past key values).

The graph takes `input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key|value`
([B, kv_heads, past, head_dim]) and returns `logits` and `present.{i}.key|value`. The KV cache
stays in ONNX Runtime's own `OrtValue`s between steps (IO binding): each step's presents are bound
as the next step's pasts, so the cache is never copied through numpy.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.backends.base import BackendInfo, Logits, TokenIds
from agent.errors import BundleError, EngineError

log = logging.getLogger(__name__)

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class OrtDecodeState:
    """KV cache of one batch, kept as OrtValues between steps."""

    batch_size: int
    attention_mask: np.ndarray  # [B, past] int64; rows may later be left-padded with zeros
    past: dict[str, ort.OrtValue] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class OnnxRuntimeBackend:
    """Backend over an ONNX Runtime session (CPU here, CUDA when its provider is present)."""

    def __init__(
        self,
        model_path: Path,
        max_seq_len: int,
        *,
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 = one thread per physical core, right for a device that serves nothing else.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        chosen = providers or _default_providers()
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError("bad_model", f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self._past_names, self._kv_heads, self._head_dim, self._kv_dtype = _inspect_past(
            self._session
        )
        output_names = [o.name for o in self._session.get_outputs()]
        self._present_names = {
            name: name.replace("past_key_values.", "present.") for name in self._past_names
        }
        missing = [p for p in self._present_names.values() if p not in output_names]
        if "logits" not in output_names or missing:
            raise BundleError("bad_model", f"{model_path}: expected outputs logits/present.*")
        input_names = {i.name for i in self._session.get_inputs()}
        self._has_position_ids = "position_ids" in input_names
        vocab = self._session.get_outputs()[0].shape[-1]
        active = self._session.get_providers()[0]
        self.info = BackendInfo(
            name="onnxruntime",
            device="cuda" if active == "CUDAExecutionProvider" else "cpu",
            max_seq_len=max_seq_len,
            vocab_size=int(vocab) if isinstance(vocab, int) else 0,
        )
        log.info("onnxruntime session on %s (%s)", active, model_path.name)

    def new_state(self, batch_size: int) -> OrtDecodeState:
        return OrtDecodeState(batch_size, np.zeros((batch_size, 0), dtype=np.int64))

    def prefill(self, state: OrtDecodeState, input_ids: TokenIds) -> Logits:
        return self._step(state, np.asarray(input_ids, dtype=np.int64))

    def decode(self, state: OrtDecodeState, token_ids: TokenIds) -> Logits:
        return self._step(state, np.asarray(token_ids, dtype=np.int64).reshape(-1, 1))

    def concat(self, states: list[OrtDecodeState]) -> OrtDecodeState:
        length = max(st.length for st in states)
        batch = sum(st.batch_size for st in states)
        mask = np.concatenate([_pad_left(st.attention_mask, length, axis=1) for st in states])
        past = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.concatenate([_pad_left(st.past[name].numpy(), length, axis=2) for st in states])
            )
            for name in self._past_names
        }
        return OrtDecodeState(batch, mask, past)

    def select(self, state: OrtDecodeState, rows: list[int]) -> OrtDecodeState:
        mask = state.attention_mask[rows]
        # Columns no remaining row attends to (left padding of rows that left) are dropped.
        first = int(np.argmax(mask.any(axis=0))) if mask.size else 0
        past = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value.numpy()[rows][:, :, first:, :])
            )
            for name, value in state.past.items()
        }
        return OrtDecodeState(len(rows), np.ascontiguousarray(mask[:, first:]), past)

    def close(self) -> None:
        del self._session

    def _step(self, state: OrtDecodeState, input_ids: TokenIds) -> Logits:
        batch, new = input_ids.shape
        if batch != state.batch_size:
            raise EngineError(f"batch of {batch} rows given to a state of {state.batch_size}")
        if state.length + new > self.info.max_seq_len:
            raise EngineError(
                f"context full: {state.length} + {new} tokens > {self.info.max_seq_len}"
            )
        mask = np.concatenate([state.attention_mask, np.ones((batch, new), np.int64)], axis=1)
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._has_position_ids:
            # Positions count only real (unmasked) tokens, so left-padded rows stay correct.
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new:]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name in self._past_names:
            value = state.past.get(name)
            if value is None:
                empty: np.ndarray = np.zeros(
                    (batch, self._kv_heads, 0, self._head_dim), self._kv_dtype
                )
                value = ort.OrtValue.ortvalue_from_numpy(empty)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for present in self._present_names.values():
            binding.bind_output(present, "cpu")
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed: {exc}") from exc
        outputs = dict(zip(self._output_order(), binding.get_outputs(), strict=True))
        state.past = {past: outputs[present] for past, present in self._present_names.items()}
        state.attention_mask = mask
        logits = outputs["logits"].numpy()  # [B, S, vocab]
        return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)

    def _output_order(self) -> list[str]:
        return ["logits", *self._present_names.values()]


def _pad_left(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = os.environ.get("EDGE_AGENT_ORT_PROVIDERS")
    if wanted:
        return [p for p in wanted.split(",") if p in available] or ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _inspect_past(session: ort.InferenceSession) -> tuple[list[str], int, int, type]:
    """Past input names in layer order, KV heads, head dim and dtype, read from the graph."""
    pasts: list[tuple[int, int, str]] = []
    kv_heads = head_dim = 0
    dtype: type = np.float32
    for inp in session.get_inputs():
        match = _PAST_RE.match(inp.name)
        if match is None:
            continue
        pasts.append((int(match.group(1)), 0 if match.group(2) == "key" else 1, inp.name))
        shape = inp.shape
        if isinstance(shape[1], int):
            kv_heads = shape[1]
        if isinstance(shape[3], int):
            head_dim = shape[3]
        dtype = _ORT_DTYPES.get(inp.type, np.float32)
    if not pasts or not kv_heads or not head_dim:
        raise BundleError(
            "bad_model",
            "the ONNX graph has no past_key_values inputs (export it with a KV cache)",
        )
    return [name for _, _, name in sorted(pasts)], kv_heads, head_dim, dtype
