"""The two optimization profiles of an LLM engine, shared by `edge-build compile` and the backend.

A decoder exported with a KV cache (optimum's text-generation-with-past) takes
`input_ids` [B, S], `attention_mask` [B, past + S], `position_ids` [B, S] and
`past_key_values.{i}.key|value` [B, kv_heads, past, head_dim]. TensorRT needs, for each dynamic
input, the range of shapes an engine must accept (an optimization profile). Prefill and decode
have very different shapes, so they get one profile each and TensorRT tunes kernels for both:

- profile 0, prefill: S in 1..max_prefill, past in 0..max_context-1 (a long prompt is fed in
  chunks, and a chunk after the first has a past);
- profile 1, decode: S = 1, past in 1..max_context-1.

The empty past (length 0) of a first prefill is a zero-length dimension. The TensorRT developer
guide, "Empty Tensors" (TensorRT 10:
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#empty-tensors,
earlier https://docs.nvidia.com/deeplearning/tensorrt/developer-guide/index.html#empty-tensors),
says: TensorRT supports empty tensors, tensors with one or more zero-length dimensions;
zero-length dimensions usually get no special treatment (a rule that holds for a length L of any
positive value usually holds for L = 0 too, so the graph's Concat of an empty past with the new
keys is just the new keys); and "if an engine binding is an empty tensor, it still needs a
non-null memory address, and different tensors should have different addresses". So the prefill
profile's minimum past is 0, and the backend binds every past tensor to its own KV buffer even
when it is empty (each buffer is allocated once, at the maximum size, so the addresses are real
and distinct). ONNX Runtime GenAI builds its TensorRT profiles the same way
(context profile: past KV `B x H x 0 x D`; generation profile: past >= 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.backends.kv_layout import layer_order
from agent.backends.tensorrt.seam import ProfileShape, Shape

PREFILL_PROFILE = 0
DECODE_PROFILE = 1

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# The shapes TensorRT tunes its kernels for (the "opt" of each profile): one chat turn, one row.
OPT_PREFILL_TOKENS = 256
OPT_DECODE_CONTEXT = 512


@dataclass(frozen=True)
class ProfileLimits:
    """How large a batch and a context the engine accepts."""

    max_batch: int  # rows decoded together
    max_prefill: int  # tokens one prefill step takes (longer prompts are prefilled in chunks)
    max_context: int  # tokens one row holds: prompt + generated

    def problems(self) -> list[str]:
        found = []
        if self.max_batch < 1:
            found.append(f"max batch {self.max_batch} must be at least 1")
        if self.max_context < 2:
            found.append(f"max context {self.max_context} must be at least 2 tokens")
        if not 1 <= self.max_prefill <= self.max_context:
            found.append(
                f"max prefill {self.max_prefill} must be between 1 and the max context "
                f"({self.max_context})"
            )
        return found


def llm_profiles(
    inputs: Mapping[str, Shape], limits: ProfileLimits
) -> list[dict[str, ProfileShape]]:
    """(min, opt, max) of every input for [prefill, decode]. `inputs` maps each graph input to its
    shape as exported (-1 where dynamic). Raises ValueError naming what does not fit."""
    problems = limits.problems()
    if problems:
        raise ValueError("; ".join(problems))
    pasts = layer_order(inputs)
    if not pasts:
        raise ValueError("the graph has no past_key_values inputs (export it with a KV cache)")
    for required in (INPUT_IDS, ATTENTION_MASK):
        if required not in inputs:
            raise ValueError(f"the graph has no {required!r} input")
    unknown = sorted(set(inputs) - {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *pasts})
    if unknown:
        raise ValueError(f"the graph has inputs this compiler cannot shape: {', '.join(unknown)}")

    b, p, c = limits.max_batch, limits.max_prefill, limits.max_context
    opt_prefill = min(p, OPT_PREFILL_TOKENS)
    opt_past = min(c - 1, OPT_DECODE_CONTEXT)
    prefill: dict[str, ProfileShape] = {
        INPUT_IDS: ((1, 1), (1, opt_prefill), (b, p)),
        ATTENTION_MASK: ((1, 1), (1, opt_prefill), (b, c)),
    }
    decode: dict[str, ProfileShape] = {
        INPUT_IDS: ((1, 1), (1, 1), (b, 1)),
        ATTENTION_MASK: ((1, 2), (1, opt_past + 1), (b, c)),
    }
    if POSITION_IDS in inputs:
        prefill[POSITION_IDS] = prefill[INPUT_IDS]
        decode[POSITION_IDS] = decode[INPUT_IDS]
    for name in pasts:
        shape = inputs[name]
        if len(shape) != 4 or shape[1] <= 0 or shape[3] <= 0:
            raise ValueError(
                f"{name} has shape {list(shape)}; expected [batch, kv_heads, past, head_dim] "
                "with fixed kv_heads and head_dim"
            )
        heads, dim = shape[1], shape[3]
        prefill[name] = ((1, heads, 0, dim), (1, heads, 0, dim), (b, heads, c - 1, dim))
        decode[name] = ((1, heads, 1, dim), (1, heads, opt_past, dim), (b, heads, c - 1, dim))
    return [prefill, decode]


def profile_for_step(past: int, new_tokens: int) -> int:
    """Decode's profile only fits one new token after a non-empty past; all else is prefill."""
    return DECODE_PROFILE if new_tokens == 1 and past >= 1 else PREFILL_PROFILE
