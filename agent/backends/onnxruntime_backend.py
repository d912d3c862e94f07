"""ONNX Runtime backend: runs the bundle's `model.onnx`, whichever KV contract its graph has.

- CPU graphs built by `edge-build` for `--target cpu` use `GroupQueryAttention` with one KV buffer
  per layer shared by past and present (`ort_shared_kv`): nothing is copied per step and rows of
  different lengths batch without padding.
- Every other graph (the fp32 reference, the Q/DQ graphs for TensorRT run on the CPU, older
  bundles) has optimum's past/present contract (`ort_past_present`).

Either way the cache never goes through numpy between steps, and only the last position's logits
are computed (graphs with a `logits_start` input) and copied out unless a caller (the accuracy
gate) asks for every position.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agent.backends.base import BackendInfo, Logits, TokenIds
from agent.backends.kv_layout import KvLayout
from agent.backends.ort_past_present import PastPresentCache
from agent.backends.ort_shared_kv import SEQLENS_INPUT, SharedKvCache, SharedKvState
from agent.errors import BundleError, EngineError

log = logging.getLogger(__name__)

LOGITS_START_INPUT = "logits_start"  # must match build_engine.quantize.logits_slice
_LAST = np.array([-1], np.int64)
_ALL = np.array([0], np.int64)


class _KvCache(Protocol):
    """What the backend needs of a KV contract (see the two modules above)."""

    def new_state(self, batch_size: int, expected_length: int) -> Any: ...
    def longest(self, state: Any) -> int: ...
    def bind(self, binding: ort.IOBinding, state: Any, new: int) -> None: ...
    def advance(self, state: Any, presents: list[ort.OrtValue], new: int) -> None: ...
    def concat(self, states: list[Any]) -> Any: ...
    def select(self, state: Any, rows: list[int]) -> Any: ...


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
        # The pool's threads still spin inside a run (turning that off cost 13% of decode speed)
        # but stop when the run returns: spinning on between runs held both cores of a 2-core
        # machine and delayed the MQTT client and the broker by milliseconds (a job's `done`
        # reached its sender 2.6 ms after it was published). Decode speed unchanged (measured).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        chosen = providers or _default_providers()
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError("bad_model", f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        layout = KvLayout.of(self._session)
        output_names = [o.name for o in self._session.get_outputs()]
        missing = [p for p in layout.present_names if p not in output_names]
        if "logits" not in output_names or missing:
            raise BundleError("bad_model", f"{model_path}: expected outputs logits/present.*")
        input_names = {i.name for i in self._session.get_inputs()}
        self.shared_kv = SEQLENS_INPUT in input_names
        self._shared = SharedKvCache(layout, max_seq_len) if self.shared_kv else None
        self._kv: _KvCache = self._shared or PastPresentCache(layout, input_names)
        self._logits_start = LOGITS_START_INPUT in input_names
        # Inputs a decode step binds once and never changes (the lm_head's last position).
        self._constants = {LOGITS_START_INPUT: _LAST.copy()} if self._logits_start else {}
        vocab = self._session.get_outputs()[0].shape[-1]
        active = self._session.get_providers()[0]
        self.info = BackendInfo(
            name="onnxruntime",
            device="cuda" if active == "CUDAExecutionProvider" else "cpu",
            max_seq_len=max_seq_len,
            vocab_size=int(vocab) if isinstance(vocab, int) else 0,
        )
        kind = "shared KV buffers" if self.shared_kv else "past/present KV"
        log.info("onnxruntime session on %s (%s, %s)", active, model_path.name, kind)

    def new_state(self, batch_size: int, expected_length: int = 0) -> Any:
        return self._kv.new_state(batch_size, expected_length)

    def prefill(self, state: Any, input_ids: TokenIds, *, all_positions: bool = False) -> Logits:
        """Logits of each row's last position ([B, vocab]), or of every position ([B, S, vocab])
        with `all_positions` (teacher-forced evaluation)."""
        return self._step(state, np.asarray(input_ids, dtype=np.int64), all_positions)

    def decode(self, state: Any, token_ids: TokenIds) -> Logits:
        if self._shared is not None and self.info.vocab_size:
            return self._decode_step(self._shared, state, token_ids)
        return self._step(state, np.asarray(token_ids, dtype=np.int64).reshape(-1, 1), False)

    def concat(self, states: list[Any]) -> Any:
        return self._kv.concat(states)

    def select(self, state: Any, rows: list[int]) -> Any:
        return self._kv.select(state, rows)

    def close(self) -> None:
        del self._session

    def _decode_step(
        self, shared: SharedKvCache, state: SharedKvState, token_ids: TokenIds
    ) -> Logits:
        """One token per row on the shared-KV graph, through the batch's reusable binding. The
        hot path of decoding: each numpy call here costs ~10 us (its data is cold after a run)."""
        longest = self._check_room(state, len(token_ids), 1)
        vocab, constants = self.info.vocab_size, self._constants
        step = shared.decode_binding(self._session, state, vocab, constants, longest)
        step.step(token_ids, state.lengths, longest)
        try:
            self._session.run_with_iobinding(step.binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed: {exc}") from exc
        shared.advance(state, [], 1)
        return step.logits[:, -1, :].copy()

    def _check_room(self, state: Any, rows: int, new: int) -> int:
        """Refuse a step whose rows do not match the state or that overflows the context; the
        longest row's length before the step."""
        if rows != state.batch_size:
            raise EngineError(f"{rows} rows of tokens given to a batch of {state.batch_size}")
        longest = int(self._kv.longest(state))
        if longest + new > self.info.max_seq_len:
            raise EngineError(f"context full: {longest} + {new} tokens > {self.info.max_seq_len}")
        return longest

    def _step(self, state: Any, input_ids: TokenIds, all_positions: bool) -> Logits:
        batch, new = input_ids.shape
        self._check_room(state, batch, new)
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        if self._logits_start:  # the lm_head runs for the last position only, unless asked
            binding.bind_cpu_input(LOGITS_START_INPUT, _ALL if all_positions else _LAST)
        binding.bind_output("logits", "cpu")
        self._kv.bind(binding, state, new)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed: {exc}") from exc
        outputs = binding.get_outputs()  # in binding order: logits, then the presents
        self._kv.advance(state, list(outputs[1:]), new)
        logits = outputs[0].numpy()  # [B, S, vocab]
        if all_positions:
            return np.asarray(logits, dtype=np.float32)
        return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = os.environ.get("EDGE_AGENT_ORT_PROVIDERS")
    if wanted:
        return [p for p in wanted.split(",") if p in available] or ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
