"""The CPU graph's attention on shared KV buffers (GroupQueryAttention) computes what the exported
graph computes: alone, across buffer growth, and in batches whose rows have different lengths,
join at different steps and leave early."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.batching import compacting_order
from agent.errors import EngineError
from build_engine.onnx_export import ExportResult
from build_engine.quantize.common import load_model, save_model
from build_engine.quantize.cpu import cpu_graph
from build_engine.quantize.cpu_attention import use_group_query_attention

CPU = ["CPUExecutionProvider"]
TOLERANCE = 1e-4  # fp32 arithmetic in a different order
FORCED = 20  # decode steps per row, on fixed tokens (a random tiny model's argmax can tie)


@pytest.fixture(scope="module")
def rewritten(
    tiny_export: ExportResult, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    model, _head, details = cpu_graph(tiny_export.onnx_path)
    out = tmp_path_factory.mktemp("cpu-graph")
    save_model(model, out)
    return out / "model.onnx", details


def _backend(path: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, max_seq_len=512, providers=CPU)


def _tokens(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 49_000, size=count, dtype=np.int64)


def test_every_layer_gets_group_query_attention(
    rewritten: tuple[Path, dict[str, Any]], tiny_dims: dict[str, int]
) -> None:
    path, details = rewritten
    assert details["attention"]["applied"] is True, details["attention"]
    assert details["attention"]["packed_qkv"] is True  # fed the merged q|k|v, no Split
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == tiny_dims["layers"]
    assert ops["RotaryEmbedding"] == 0 and ops["Softmax"] == 0
    inputs = {i.name for i in graph.input}
    assert {"seqlens_k", "total_sequence_length", "logits_start"} <= inputs
    assert not {"attention_mask", "position_ids"} & inputs
    past_readers = [n for n in graph.node if any(i.startswith("past_") for i in n.input)]
    assert {n.op_type for n in past_readers} == {"GroupQueryAttention"}


def test_same_logits_as_the_exported_graph(
    rewritten: tuple[Path, dict[str, Any]], tiny_export: ExportResult
) -> None:
    reference, candidate = _backend(tiny_export.onnx_path), _backend(rewritten[0])
    assert candidate.shared_kv and not reference.shared_kv
    prompt = _tokens(1, 70)[None, :]  # past the first 64-token buffer: the buffers grow
    ref_state, state = reference.new_state(1), candidate.new_state(1)
    expected = reference.prefill(ref_state, prompt, all_positions=True)
    got_all = candidate.prefill(state, prompt, all_positions=True)
    assert got_all.shape == expected.shape == (1, 70, 49152)
    assert np.abs(got_all - expected).max() < TOLERANCE
    # The lm_head for the last position only gives that position's logits.
    last = candidate.prefill(candidate.new_state(1), prompt)
    assert last.shape == (1, 49152)
    assert np.abs(last[0] - expected[0, -1]).max() < TOLERANCE
    for token in _tokens(2, 70):  # decode through a second buffer growth (128 tokens)
        want = reference.decode(ref_state, np.array([token]))
        got = candidate.decode(state, np.array([token]))
        assert np.abs(got - want).max() < TOLERANCE
    assert state.length == 140 and state.capacity >= 140


def test_a_jobs_expected_length_is_allocated_up_front(
    rewritten: tuple[Path, dict[str, Any]],
) -> None:
    """A job that says how long it can get is never copied into a bigger buffer mid-answer; past
    what it said, the buffers still grow by doubling, not token by token."""
    backend = _backend(rewritten[0])
    planned, unplanned = backend.new_state(1, expected_length=200), backend.new_state(1)
    prompt = _tokens(3, 70)[None, :]
    backend.prefill(planned, prompt), backend.prefill(unplanned, prompt)
    assert (planned.capacity, unplanned.capacity) == (256, 128)  # 64-token steps
    buffers = planned.buffers
    for token in _tokens(4, 130):  # up to the expected 200 tokens
        got = backend.decode(planned, np.array([token]))
        np.testing.assert_array_equal(got, backend.decode(unplanned, np.array([token])))
    assert planned.length == 200 and planned.buffers is buffers  # never reallocated
    assert unplanned.capacity == 256  # grew once on the way
    for token in _tokens(5, 57):  # past what the job said: 257 tokens
        backend.decode(planned, np.array([token]))
    assert planned.capacity == 512


def test_a_full_context_or_a_wrong_batch_is_an_engine_error(
    rewritten: tuple[Path, dict[str, Any]],
) -> None:
    backend = OnnxRuntimeBackend(rewritten[0], max_seq_len=72, providers=CPU)
    state = backend.new_state(1)
    backend.prefill(state, _tokens(6, 70)[None, :])
    with pytest.raises(EngineError, match="2 rows of tokens given to a batch of 1"):
        backend.decode(state, np.array([5, 6]))
    backend.decode(state, np.array([5]))
    backend.decode(state, np.array([6]))
    with pytest.raises(EngineError, match="context full: 72 \\+ 1 tokens > 72"):
        backend.decode(state, np.array([7]))
    assert state.length == 72  # a refused step leaves the cache as it was


def test_rows_of_different_lengths_batch_without_padding(
    rewritten: tuple[Path, dict[str, Any]],
) -> None:
    """Rows of 5, 40, 90 and 12 tokens join a running batch at different steps and leave when
    done: every row's logits stay those of the row alone. A join copies into a spare row of the
    batch's arena when it has one; a leave moves at most the last row into the place it frees."""
    backend = _backend(rewritten[0])
    prompts = [_tokens(10, 5), _tokens(11, 40), _tokens(12, 90), _tokens(13, 12)]
    forced = [_tokens(20 + r, FORCED + 5 * r) for r in range(4)]
    alone = []
    for prompt, tokens in zip(prompts, forced, strict=True):
        single = backend.new_state(1)
        steps = [backend.prefill(single, prompt[None, :])[0]]
        steps += [backend.decode(single, np.array([t]))[0] for t in tokens[:-1]]
        alone.append(steps)

    join_at = {0: 0, 1: 3, 2: 7, 3: 9}  # global step at which each row's prompt is prefilled
    rows: list[int] = []
    done = {r: 0 for r in range(4)}  # logits rows checked so far
    same_arena: list[tuple[str, bool]] = []
    state: Any = None
    for step in range(80):
        for r, at in join_at.items():
            if at == step:
                own = backend.new_state(1, expected_length=len(prompts[r]) + len(forced[r]))
                logits = backend.prefill(own, prompts[r][None, :])
                assert np.abs(logits[0] - alone[r][0]).max() < TOLERANCE
                done[r] = 1
                before = state.arena if state is not None else None
                state = own if state is None else backend.concat([state, own])
                same_arena.append(("join", state.arena is before))
                rows.append(r)
        if not rows:
            break
        logits = backend.decode(state, np.array([forced[r][done[r] - 1] for r in rows]))
        for i, r in enumerate(rows):
            assert np.abs(logits[i] - alone[r][done[r]]).max() < TOLERANCE, (r, done[r])
            done[r] += 1
        keep = [i for i, r in enumerate(rows) if done[r] < len(forced[r])]
        if len(keep) < len(rows):  # finished rows leave; the others keep their caches
            order = compacting_order(keep)
            rows = [rows[i] for i in order]
            before = state.arena
            state = backend.select(state, order) if order else None
            if state is not None:
                same_arena.append(("leave", state.arena is before))
    assert done == {r: len(forced[r]) for r in range(4)}
    # Arenas of 1, 2 and 4 rows; the fourth row joins into the spare one; no leave reallocates.
    assert same_arena == [("join", False)] * 3 + [("join", True)] + [("leave", True)] * 3


def test_a_graph_it_does_not_know_is_left_as_it_was(tiny_export: ExportResult) -> None:
    model = load_model(tiny_export.onnx_path)  # not fused: no RotaryEmbedding to start from
    before = model.SerializeToString()
    result = use_group_query_attention(model)
    assert result["applied"] is False
    assert "RotaryEmbedding" in result["reason"]
    assert model.SerializeToString() == before


def test_rotary_tables_are_cut_to_the_context(tiny_export: ExportResult) -> None:
    model, _head, details = cpu_graph(tiny_export.onnx_path, max_positions=300)
    assert details["attention"]["rotary_rows"] == 300
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    tables = {t.name: t for t in model.graph.initializer if t.name in attention.input[7:9]}
    assert len(tables) == 2 and all(t.dims[0] == 300 for t in tables.values())
