"""Buffer planning: how much memory each tensor needs, from the engine's profiles and dtypes.

Every buffer is sized once from the largest shape any optimization profile accepts (as TensorRT's
samples size theirs from `get_tensor_profile_shape(...)[-1]`), so nothing is allocated while a
job runs. The KV cache needs two sets (read the past from one, write the present to the other),
each [max_batch, kv_heads, max_context, head_dim] per past tensor (each row padded to 256 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.backends.kv_layout import KvLayout, layer_order, present_name
from agent.backends.tensorrt.profiles import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    PREFILL_PROFILE,
)
from agent.backends.tensorrt.seam import InferenceEngine, Shape
from agent.errors import BundleError

# IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment"
# (NvInferRuntime.h; https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/
# classnvinfer1_1_1_i_execution_context.html).
TENSOR_ALIGNMENT = 256


@dataclass(frozen=True)
class BufferPlan:
    max_batch: int
    max_prefill: int  # tokens one prefill step takes
    max_context: int  # tokens one row holds (past + new)
    vocab: int
    kv: KvLayout
    ids_dtype: np.dtype[Any]
    mask_dtype: np.dtype[Any]
    positions_dtype: np.dtype[Any] | None  # None: the graph takes no position_ids
    logits_dtype: np.dtype[Any]

    @property
    def kv_shape(self) -> Shape:
        """One cache tensor at its largest: [max_batch, kv_heads, max_context, head_dim]."""
        return (self.max_batch, self.kv.kv_heads, self.max_context, self.kv.head_dim)

    @property
    def kv_row_bytes(self) -> int:
        """Room for one row of one cache tensor, [kv_heads, max_context, head_dim], rounded up to
        TENSOR_ALIGNMENT so a tensor bound at the start of any row is aligned."""
        raw = self.kv.kv_heads * self.max_context * self.kv.head_dim * self.kv.dtype.itemsize
        return -(-raw // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT

    @property
    def kv_tensor_bytes(self) -> int:
        """One cache tensor's buffer: `max_batch` rows."""
        return self.max_batch * self.kv_row_bytes

    @property
    def kv_bytes(self) -> int:
        """Both KV sets: two buffers per past tensor."""
        return 2 * len(self.kv.past_names) * self.kv_tensor_bytes

    @property
    def ids_bytes(self) -> int:
        return self.max_batch * self.max_prefill * self.ids_dtype.itemsize

    @property
    def mask_bytes(self) -> int:
        return self.max_batch * self.max_context * self.mask_dtype.itemsize

    @property
    def positions_bytes(self) -> int:
        if self.positions_dtype is None:
            return 0
        return self.max_batch * self.max_prefill * self.positions_dtype.itemsize

    @property
    def logits_bytes(self) -> int:
        """Logits of every position of the largest prefill block (the graph returns them all)."""
        return self.max_batch * self.max_prefill * self.vocab * self.logits_dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return (
            self.kv_bytes + self.ids_bytes + self.mask_bytes + self.positions_bytes
            + self.logits_bytes
        )  # fmt: skip


def plan_buffers(engine: InferenceEngine, max_context: int | None = None) -> BufferPlan:
    """Size every buffer from the engine's profiles; `max_context` may only lower the context."""
    inputs, outputs = set(engine.input_names), set(engine.output_names)
    pasts = layer_order(inputs)
    missing = [n for n in (INPUT_IDS, ATTENTION_MASK) if n not in inputs]
    missing += [n for n in (LOGITS, *map(present_name, pasts)) if n not in outputs]
    if not pasts or missing:
        raise _bad_engine(
            "expected input_ids, attention_mask, past_key_values.* inputs and logits, present.* "
            f"outputs; missing: {', '.join(missing) or 'past_key_values.*'}"
        )
    if engine.num_profiles < 2:
        raise _bad_engine(
            f"it has {engine.num_profiles} optimization profile(s); expected 2 (prefill, decode)"
        )

    ids_max = _largest(engine, INPUT_IDS)
    mask_max = _largest(engine, ATTENTION_MASK)
    max_batch = ids_max[0]
    max_prefill = engine.profile_shapes(INPUT_IDS, PREFILL_PROFILE)[2][1]
    capacity = mask_max[1]  # past + new never exceeds the attention mask's length
    if max_context is not None and max_context > 0:
        capacity = min(capacity, max_context)

    heads_dims = {(engine.tensor_shape(n)[1], engine.tensor_shape(n)[3]) for n in pasts}
    kv_dtypes = {engine.dtype(n) for n in pasts}
    if len(heads_dims) != 1 or len(kv_dtypes) != 1:
        raise _bad_engine("its past_key_values tensors differ in kv_heads, head_dim or dtype")
    ((kv_heads, head_dim),) = heads_dims
    vocab = engine.tensor_shape(LOGITS)[-1]
    if kv_heads <= 0 or head_dim <= 0 or vocab <= 0:
        raise _bad_engine("kv_heads, head_dim and the vocabulary size must be fixed in the graph")
    return BufferPlan(
        max_batch=max_batch,
        max_prefill=min(max_prefill, capacity),
        max_context=capacity,
        vocab=vocab,
        kv=KvLayout(
            past_names=tuple(pasts), kv_heads=kv_heads, head_dim=head_dim, dtype=kv_dtypes.pop()
        ),
        ids_dtype=engine.dtype(INPUT_IDS),
        mask_dtype=engine.dtype(ATTENTION_MASK),
        positions_dtype=engine.dtype(POSITION_IDS) if POSITION_IDS in inputs else None,
        logits_dtype=engine.dtype(LOGITS),
    )


def _largest(engine: InferenceEngine, name: str) -> Shape:
    """Element-wise max over every profile's max shape."""
    maxima = [engine.profile_shapes(name, p)[2] for p in range(engine.num_profiles)]
    return tuple(max(dims) for dims in zip(*maxima, strict=True))


def _bad_engine(why: str) -> BundleError:
    return BundleError("bad_engine", f"the engine does not look like an LLM decoder: {why}")
