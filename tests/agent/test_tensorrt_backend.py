"""The TensorRT backend's logic, run here through the ONNX Runtime adapter of the engine seam.

`OrtSeamEngine` is not TensorRT: it is ONNX Runtime on the CPU behind the same small interface
(named tensors, two optimization profiles, caller-owned buffers bound by address). Everything
the backend does (profile choice, shapes, the KV ping-pong, chunked prefill, reading back only
the last position's logits, regrouping rows for continuous batching) runs for real on the real
default model. The one test that needs TensorRT and a GPU is marked `gpu` and skips here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends.kv_layout import KvLayout
from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.backends.tensorrt.backend import TensorRTBackend
from agent.backends.tensorrt.kv_rows import RowPool
from agent.backends.tensorrt.ort_engine import HostBuffer, OrtSeamEngine
from agent.backends.tensorrt.plan import BufferPlan, plan_buffers
from agent.backends.tensorrt.profiles import (
    DECODE_PROFILE,
    PREFILL_PROFILE,
    ProfileLimits,
    llm_profiles,
    profile_for_step,
)
from agent.backends.tensorrt.seam import TensorBuffer
from agent.batching import BatchGenerator
from agent.bundle import open_bundle
from agent.canary import check_golden, read_golden
from agent.errors import EngineError
from agent.generation import GenerationRequest, GenerationResult, SequenceRun, generate
from agent.text import TextCodec

LIMITS = ProfileLimits(max_batch=4, max_prefill=64, max_context=256)
SMOLLM2_INPUTS = {
    "input_ids": (-1, -1),
    "attention_mask": (-1, -1),
    "position_ids": (-1, -1),
    **{f"past_key_values.{i}.{kv}": (-1, 3, -1, 64) for i in range(2) for kv in ("key", "value")},
}


# --- profiles ----------------------------------------------------------------------------------


def test_prefill_and_decode_profiles() -> None:
    prefill, decode = llm_profiles(SMOLLM2_INPUTS, LIMITS)
    assert prefill["input_ids"] == ((1, 1), (1, 64), (4, 64))
    assert prefill["position_ids"] == prefill["input_ids"]
    assert prefill["attention_mask"] == ((1, 1), (1, 64), (4, 256))
    # The first prefill has an empty past: the profile accepts a past of length 0.
    assert prefill["past_key_values.0.key"] == ((1, 3, 0, 64), (1, 3, 0, 64), (4, 3, 255, 64))
    assert decode["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode["attention_mask"] == ((1, 2), (1, 256), (4, 256))
    assert decode["past_key_values.1.value"] == ((1, 3, 1, 64), (1, 3, 255, 64), (4, 3, 255, 64))
    assert profile_for_step(past=0, new_tokens=37) == PREFILL_PROFILE
    assert profile_for_step(past=0, new_tokens=1) == PREFILL_PROFILE  # a one-token prompt
    assert profile_for_step(past=36, new_tokens=1) == DECODE_PROFILE
    assert profile_for_step(past=64, new_tokens=20) == PREFILL_PROFILE  # a later chunk


def test_profiles_refuse_what_they_cannot_shape() -> None:
    with pytest.raises(ValueError, match="max prefill 300 must be between 1 and"):
        llm_profiles(SMOLLM2_INPUTS, ProfileLimits(1, 300, 256))
    with pytest.raises(ValueError, match="cannot shape: cache_position"):
        llm_profiles({**SMOLLM2_INPUTS, "cache_position": (-1,)}, LIMITS)
    with pytest.raises(ValueError, match="no past_key_values"):
        llm_profiles({"input_ids": (-1, -1), "attention_mask": (-1, -1)}, LIMITS)
    dynamic_heads = {**SMOLLM2_INPUTS, "past_key_values.0.key": (-1, -1, -1, 64)}
    with pytest.raises(ValueError, match="fixed kv_heads and head_dim"):
        llm_profiles(dynamic_heads, LIMITS)


# --- buffer planning and row leases --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_factory(orin_reference: Path) -> Any:
    def make(limits: ProfileLimits = LIMITS) -> OrtSeamEngine:
        return OrtSeamEngine(orin_reference / "model.onnx", limits)

    return make


def test_buffers_are_sized_from_the_profile_maxima(engine_factory: Any) -> None:
    plan = plan_buffers(engine_factory())
    assert (plan.max_batch, plan.max_prefill, plan.max_context, plan.vocab) == (4, 64, 256, 49152)
    assert len(plan.kv.past_names) == 60 and plan.kv.present_names[1] == "present.0.value"
    assert plan.kv_shape == (4, 3, 256, 64)
    assert plan.kv.dtype == np.float32 and plan.ids_dtype == np.int64
    assert plan.kv_row_bytes == 3 * 256 * 64 * 4  # already a multiple of 256 bytes
    assert plan.kv_tensor_bytes == 4 * plan.kv_row_bytes
    assert plan.kv_bytes == 2 * 60 * plan.kv_tensor_bytes  # two sets: ping and pong
    assert plan.logits_bytes == 4 * 64 * 49152 * 4
    assert plan.mask_bytes == 4 * 256 * 8 and plan.ids_bytes == plan.positions_bytes == 4 * 64 * 8
    smaller = plan_buffers(engine_factory(), max_context=100)  # a config may only lower it
    assert smaller.max_context == 100 and smaller.kv_shape == (4, 3, 100, 64)


def test_kv_rows_are_padded_to_tensorrts_alignment() -> None:
    plan = BufferPlan(
        max_batch=2, max_prefill=4, max_context=5, vocab=7,
        kv=KvLayout(("past_key_values.0.key",), 1, 3, np.dtype(np.float16)),
        ids_dtype=np.dtype(np.int64), mask_dtype=np.dtype(np.int64), positions_dtype=None,
        logits_dtype=np.dtype(np.float16),
    )  # fmt: skip
    assert plan.kv_row_bytes == 256  # 1 * 5 * 3 * 2 = 30 bytes, rounded up
    assert plan.positions_bytes == 0


def test_row_pool_leases_contiguous_rows() -> None:
    pool = RowPool(4)
    a, b = pool.take(2), pool.take(1)
    assert (a.start, b.start, pool.free_rows) == (0, 2, 1)
    with pytest.raises(EngineError, match="only 1 of 4 are free"):
        pool.take(2)
    joined = pool.take(3, reuse=[a, b])  # the rows of the batches it replaces
    pool.release(a)
    pool.release(b)
    assert (joined.start, joined.count, pool.free_rows) == (0, 3, 1)
    pool.release(joined)
    pool.release(joined)  # idempotent
    assert pool.free_rows == 4


def test_host_buffer_strided_reads() -> None:
    buffer = HostBuffer(6 * 4)
    buffer.write(np.arange(6, dtype=np.float32))
    out = np.empty((2, 2), np.float32)
    buffer.read_rows(out, offset=4, pitch=12)  # rows [1, 2] and [4, 5]
    assert out.tolist() == [[1, 2], [4, 5]]
    with pytest.raises(EngineError):
        buffer.read_rows(out, offset=16, pitch=12)


def test_the_adapter_refuses_shapes_outside_the_active_profile(engine_factory: Any) -> None:
    engine = engine_factory()
    engine.set_optimization_profile(DECODE_PROFILE)
    with pytest.raises(EngineError, match="outside optimization profile 1"):
        engine.set_input_shape("input_ids", (1, 5))  # decode takes one token
    with pytest.raises(EngineError, match="outside optimization profile 1"):
        engine.set_input_shape("past_key_values.0.key", (1, 3, 0, 64))  # decode needs a past
    engine.set_optimization_profile(PREFILL_PROFILE)
    engine.set_input_shape("past_key_values.0.key", (1, 3, 0, 64))
    engine.close()


# --- the backend on the real model -------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(engine_factory: Any) -> Iterator[TensorRTBackend]:
    with TensorRTBackend(engine_factory()) as b:
        yield b


@pytest.fixture(scope="module")
def codec(orin_reference: Path) -> TextCodec:
    manifest = open_bundle(orin_reference).manifest
    return TextCodec(orin_reference, eos_token_ids=manifest.tokenizer["eos_token_ids"])


def test_backend_reproduces_the_bundles_golden_tokens(
    backend: TensorRTBackend, codec: TextCodec, orin_reference: Path
) -> None:
    assert backend.info.name == "onnxruntime-seam"  # never passes itself off as TensorRT
    assert backend.info.max_seq_len == 256 and backend.info.vocab_size == 49152
    assert check_golden(orin_reference, backend, codec) == []


def test_logits_match_the_onnxruntime_backend(
    backend: TensorRTBackend, codec: TextCodec, orin_reference: Path
) -> None:
    reference = OnnxRuntimeBackend(orin_reference / "model.onnx", max_seq_len=256)
    ids = np.asarray([codec.encode_prompt("The three states of water are")])
    ours, theirs = backend.new_state(1), reference.new_state(1)
    np.testing.assert_array_equal(backend.prefill(ours, ids), reference.prefill(theirs, ids))
    token = np.asarray([11], np.int64)
    np.testing.assert_array_equal(backend.decode(ours, token), reference.decode(theirs, token))
    reference.close()


def test_batch_of_two_identical_prompts_gives_identical_rows(
    backend: TensorRTBackend, codec: TextCodec
) -> None:
    prompt = codec.encode_messages([{"role": "user", "content": "Name three primary colors."}])
    state = backend.new_state(2)
    logits = backend.prefill(state, np.asarray([prompt, prompt]))  # [2, vocab]
    assert logits.shape == (2, 49152)
    np.testing.assert_array_equal(logits[0], logits[1])
    for _ in range(6):
        tokens = logits.argmax(axis=1)
        assert tokens[0] == tokens[1]
        logits = backend.decode(state, tokens)
        np.testing.assert_array_equal(logits[0], logits[1])
    assert state.length == len(prompt) + 6


def test_long_prompts_are_prefilled_in_chunks(
    engine_factory: Any, codec: TextCodec, orin_reference: Path
) -> None:
    canary, prompt_ids, expected = read_golden(orin_reference)[0]
    assert len(prompt_ids) > 16
    with TensorRTBackend(engine_factory(ProfileLimits(1, 16, 256))) as chunked:
        result = generate(chunked, codec, GenerationRequest(prompt_ids, canary.max_new_tokens))
    assert result.token_ids == expected


class Spy:
    """Records what the backend binds; delegates everything to the real engine."""

    def __init__(self, engine: OrtSeamEngine) -> None:
        self.engine = engine
        self.kind, self.device = engine.kind, engine.device
        self.bound: list[tuple[str, int, tuple[int, ...] | None]] = []
        self.allocations = 0
        self.profiles: list[int] = []
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def allocate(self, nbytes: int) -> TensorBuffer:
        self.allocations += 1
        return self.engine.allocate(nbytes)

    def set_optimization_profile(self, index: int) -> None:
        self.profiles.append(index)
        self.engine.set_optimization_profile(index)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self._shapes[name] = tuple(shape)
        self.engine.set_input_shape(name, shape)

    def set_tensor_address(self, name: str, buffer: TensorBuffer, offset: int = 0) -> None:
        self.bound.append((name, buffer.address + offset, self._shapes.get(name)))
        self.engine.set_tensor_address(name, buffer, offset)

    def addresses(self, name: str) -> list[int]:
        return [address for n, address, _ in self.bound if n == name]


def test_kv_sets_swap_instead_of_being_copied(engine_factory: Any, codec: TextCodec) -> None:
    spy = Spy(engine_factory())
    with TensorRTBackend(spy) as b:  # type: ignore[arg-type]
        allocated = spy.allocations
        state = b.new_state(1)
        logits = b.prefill(state, np.asarray([codec.encode_prompt("Hello there")]))
        for _ in range(4):
            logits = b.decode(state, logits.argmax(axis=1))
        assert spy.allocations == allocated  # nothing allocated after construction
    past, present = spy.addresses("past_key_values.0.key"), spy.addresses("present.0.key")
    assert len(past) == 5 and len(set(past)) == 2  # two KV sets, used in turn
    assert past[1:] == present[:-1]  # each step reads the past where the last wrote its present
    assert all(p != q for p, q in zip(past, present, strict=True))
    assert spy.profiles == [PREFILL_PROFILE, DECODE_PROFILE, DECODE_PROFILE, DECODE_PROFILE,
                            DECODE_PROFILE]  # fmt: skip
    # The empty past of the first prefill is still bound to a real, distinct address.
    first = [(n, a, s) for n, a, s in spy.bound[: len(spy.bound) // 5] if n.startswith("past_")]
    assert all(shape == (1, 3, 0, 64) and address for _, address, shape in first)
    assert len({address for _, address, _ in first}) == len(first) == 60


def test_continuous_batching_gives_the_same_tokens(
    backend: TensorRTBackend, codec: TextCodec
) -> None:
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Hi",
               "List three uses of copper."]  # fmt: skip
    requests = [
        GenerationRequest(codec.encode_messages([{"role": "user", "content": p}]), 8 + 5 * i)
        for i, p in enumerate(prompts)
    ]
    alone = [generate(backend, codec, r) for r in requests]
    results: dict[int, GenerationResult | None] = {}
    batch: BatchGenerator[int] = BatchGenerator(backend, max_batch=3)  # type: ignore[arg-type]

    def submit(i: int) -> None:
        batch.submit(SequenceRun(requests[i], codec, backend.info.max_seq_len), i)

    def step() -> None:
        for end in batch.step().ended:
            results[end.key] = end.result

    submit(0)
    submit(1)
    step()
    step()
    submit(2)  # joins a running batch: concat() regroups the KV rows
    submit(3)  # waits for a row to leave: select() drops finished rows
    while not batch.idle:
        step()
    for i, expected in enumerate(alone):
        got = results[i]
        assert got is not None and got.token_ids == expected.token_ids, f"prompt {i} diverged"
    assert backend._rows.free_rows == backend.max_batch  # every state gave its rows back


def test_state_errors_say_what_is_wrong(backend: TensorRTBackend, codec: TextCodec) -> None:
    with pytest.raises(EngineError, match="at most 4"):
        backend.new_state(5)
    a, b = backend.new_state(1), backend.new_state(1)
    backend.prefill(a, np.asarray([[1, 2, 3]]))
    backend.prefill(b, np.asarray([[4, 5]]))
    joined = backend.concat([a, b])
    assert joined.batch_size == 2 and joined.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    with pytest.raises(EngineError, match="used up by concat"):
        backend.decode(a, np.asarray([1]))
    narrowed = backend.select(joined, [1])
    assert narrowed.attention_mask.tolist() == [[1, 1]]  # the padding column went with row 0
    full = backend.new_state(1)
    with pytest.raises(EngineError, match="context full"):
        backend.prefill(full, np.zeros((1, 257), np.int64))


# --- on a Jetson ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_engine_answers_like_the_onnx_bundle(orin_reference: Path, tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorrt", reason="needs TensorRT and an NVIDIA GPU (Jetson); not available on this CPU "
        "machine"
    )  # fmt: skip
    from agent.backends.tensorrt.trt_engine import TensorRTEngine
    from build_engine.compile import CompileOptions, compile_bundle

    out = tmp_path / "engine"
    compile_bundle(orin_reference, out, CompileOptions(max_batch=2, max_prefill=64,
                   max_context=256, opt_level=1), progress=print)  # fmt: skip
    manifest = open_bundle(orin_reference).manifest
    codec = TextCodec(out, eos_token_ids=manifest.tokenizer["eos_token_ids"])
    with TensorRTBackend(TensorRTEngine.from_file(out / "engine.plan")) as trt_backend:
        assert trt_backend.info.name == "tensorrt"
        assert check_golden(out, trt_backend, codec) == []  # its own golden tokens
        prompt = codec.encode_prompt("The three states of water are")
        state = trt_backend.new_state(2)
        logits = trt_backend.prefill(state, np.asarray([prompt, prompt]))
        np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5)
        reference = OnnxRuntimeBackend(orin_reference / "model.onnx", max_seq_len=256)
        expected = reference.prefill(reference.new_state(1), np.asarray([prompt]))
        assert logits[0].argmax() == expected[0].argmax()  # fp32 (or TF32) vs ONNX Runtime
