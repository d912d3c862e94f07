"""Where an ONNX decoder keeps its KV cache: names, heads, head size and dtype (from the graph)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from agent.errors import BundleError

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class KvLayout:
    past_names: list[str]  # in layer order, key before value
    kv_heads: int
    head_dim: int
    dtype: type

    @property
    def present_names(self) -> list[str]:
        return [name.replace("past_key_values.", "present.", 1) for name in self.past_names]

    def empty(self, batch: int, length: int) -> np.ndarray:
        return np.zeros((batch, self.kv_heads, length, self.head_dim), self.dtype)

    @classmethod
    def of(cls, session: ort.InferenceSession) -> KvLayout:
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
        return cls([name for _, _, name in sorted(pasts)], kv_heads, head_dim, dtype)
