"""Where a decoder keeps its KV cache: tensor names in layer order, heads, head size and dtype.

One description for every backend: ONNX Runtime reads it from the session's inputs
(`KvLayout.of`), TensorRT's buffer plan from the engine's tensors (`tensorrt.plan`). Rows of
different lengths share a batch by left padding, masked (`pad_left`), in both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import BundleError

if TYPE_CHECKING:
    import onnxruntime as ort

# `past_key_values.{layer}.key|value` [B, kv_heads, past, head_dim]; the graph writes the grown
# cache to the same name under `present.`.
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def present_name(past_name: str) -> str:
    """`past_key_values.3.key` -> `present.3.key`: where the graph writes the grown cache."""
    return past_name.replace("past_key_values.", "present.", 1)


def layer_order(names: Iterable[str]) -> list[str]:
    """The past tensors among `names`, in layer order, key before value."""
    found = [(PAST_RE.match(name), name) for name in names]
    pasts = [(int(m.group(1)), m.group(2) == "value", name) for m, name in found if m is not None]
    return [name for *_, name in sorted(pasts)]


@dataclass(frozen=True)
class KvLayout:
    """The cache tensors, in layer order, and the shape facts every one of them shares."""

    past_names: tuple[str, ...]  # in layer order, key before value
    kv_heads: int
    head_dim: int
    dtype: np.dtype[Any]

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(present_name(name) for name in self.past_names)

    def empty(self, batch: int, length: int) -> np.ndarray[Any, Any]:
        return np.zeros((batch, self.kv_heads, length, self.head_dim), self.dtype)

    @classmethod
    def of(cls, session: ort.InferenceSession) -> KvLayout:
        """The layout an ONNX Runtime session's `past_key_values.*` inputs declare."""
        inputs = {inp.name: inp for inp in session.get_inputs()}
        pasts = layer_order(inputs)
        kv_heads = head_dim = 0
        dtype: type = np.float32
        for name in pasts:
            shape = inputs[name].shape
            if isinstance(shape[1], int):
                kv_heads = shape[1]
            if isinstance(shape[3], int):
                head_dim = shape[3]
            dtype = _ORT_DTYPES.get(inputs[name].type, np.float32)
        if not pasts or not kv_heads or not head_dim:
            raise BundleError(
                "bad_model",
                "the ONNX graph has no past_key_values inputs (export it with a KV cache)",
            )
        return cls(tuple(pasts), kv_heads, head_dim, np.dtype(dtype))


def pad_left(array: np.ndarray[Any, Any], length: int, axis: int) -> np.ndarray[Any, Any]:
    """`array` with zeros in front along `axis` up to `length` (itself when already that long)."""
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)
