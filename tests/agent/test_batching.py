"""Continuous batching gives the same greedy tokens as one job at a time, with jobs joining a
running batch and leaving it at different steps, and long prompts prefilled in chunks between the
running jobs' steps."""

from __future__ import annotations

from typing import Any

import pytest

from agent.backends.base import Backend, Logits, TokenIds
from agent.batching import PREFILL_CHUNK, BatchGenerator, compacting_order
from agent.errors import AgentError
from agent.generation import GenerationRequest, GenerationResult, SequenceRun, generate
from agent.runtime import LoadedModel, load_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Explain what a transformer is in one sentence.",
    "Hi",
]


@pytest.fixture(scope="module", params=["shared-kv", "past-present"])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    """Both KV contracts: the cpu graph (shared buffers, rows of their own lengths) and the
    portable graph (past/present, rows left-padded), which ONNX Runtime runs on a GPU too."""
    bundle = "default_bundle" if request.param == "shared-kv" else "orin_reference"
    loaded = load_model(request.getfixturevalue(bundle))
    assert getattr(loaded.backend, "shared_kv", None) is (request.param == "shared-kv")
    return loaded


def requests(model: LoadedModel) -> list[GenerationRequest]:
    out = []
    for i, text in enumerate(PROMPTS):
        ids = model.codec.encode_messages([{"role": "user", "content": text}])
        stop = ("\n",) if i == 2 else ()
        out.append(GenerationRequest(ids, max_tokens=12 + 6 * i, stop=stop))
    return out


@pytest.mark.parametrize("chunk", [PREFILL_CHUNK, 7], ids=["whole-prompts", "prompt-chunks"])
def test_batched_greedy_equals_one_at_a_time(model: LoadedModel, chunk: int) -> None:
    reqs = requests(model)
    alone = [generate(model.backend, model.codec, r) for r in reqs]
    results: dict[int, GenerationResult | None] = {}
    streamed: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    batch = BatchGenerator(model.backend, max_batch=4, prefill_chunk=chunk)

    def submit(i: int) -> None:
        run = SequenceRun(
            reqs[i], model.codec, model.backend.info.max_seq_len, on_text=streamed[i].append
        )
        batch.submit(run, lambda _run, result, error: results.__setitem__(i, result))

    submit(0)
    submit(1)
    for _ in range(3):
        batch.step()
    submit(2)  # joins a batch that is 3 steps in
    batch.step()
    submit(3)
    submit(4)  # waits: the batch is full until a row leaves
    steps = 0
    while not batch.idle:
        batch.step()
        steps += 1
        assert steps < 500
    assert sorted(results) == list(range(len(reqs)))
    for i, expected in enumerate(alone):
        got = results[i]
        assert got is not None, f"prompt {i} failed in the batch"
        assert got.token_ids == expected.token_ids, f"prompt {i} diverged in the batch"
        assert got.text == expected.text == "".join(streamed[i])
        assert got.finish_reason == expected.finish_reason


def test_a_leaving_row_is_replaced_by_one_from_the_end() -> None:
    """Survivors inside the smaller batch stay put; each gap takes a survivor from beyond it."""
    assert compacting_order([1, 2, 3]) == [3, 1, 2]  # row 0 left: the last row takes its place
    assert compacting_order([0, 2, 5]) == [0, 5, 2]  # rows 1, 3, 4 left
    assert compacting_order([0, 1]) == [0, 1]  # the last rows left: nothing moves
    assert compacting_order([4]) == [4]
    assert compacting_order([]) == []


class RecordingBackend:
    """The real backend, with a log of what each call was given: ("prefill", tokens) or
    ("decode", rows)."""

    def __init__(self, inner: Backend[Any]) -> None:
        self.inner = inner
        self.info = inner.info
        self.calls: list[tuple[str, int]] = []

    def new_state(self, batch_size: int, expected_length: int = 0) -> Any:
        return self.inner.new_state(batch_size, expected_length)

    def prefill(self, state: Any, input_ids: TokenIds) -> Logits:
        self.calls.append(("prefill", int(input_ids.shape[1])))
        return self.inner.prefill(state, input_ids)

    def decode(self, state: Any, token_ids: TokenIds) -> Logits:
        self.calls.append(("decode", len(token_ids)))
        return self.inner.decode(state, token_ids)

    def concat(self, states: list[Any]) -> Any:
        return self.inner.concat(states)

    def select(self, state: Any, rows: list[int]) -> Any:
        return self.inner.select(state, rows)

    def close(self) -> None:
        self.inner.close()


def _submit(
    batch: BatchGenerator, model: LoadedModel, request: GenerationRequest, **kwargs: Any
) -> dict[str, Any]:
    """Submit one job; the returned dict gets its `result` and `error` when it finishes."""
    outcome: dict[str, Any] = {}

    def finished(
        _run: SequenceRun, result: GenerationResult | None, error: AgentError | None
    ) -> None:
        outcome.update(result=result, error=error)

    run = SequenceRun(request, model.codec, model.backend.info.max_seq_len, **kwargs)
    batch.submit(run, finished)
    return outcome


@pytest.fixture(scope="module")
def cpu_model(default_bundle: Any) -> LoadedModel:
    return load_model(default_bundle)


def test_a_long_prompt_joins_in_chunks_between_the_running_jobs_steps(
    cpu_model: LoadedModel,
) -> None:
    backend = RecordingBackend(cpu_model.backend)
    short = GenerationRequest(cpu_model.codec.encode_prompt("Count:"), 20, ignore_eos=True)
    long_ids = cpu_model.codec.encode_prompt("The history of the river, told slowly: " * 12)[:60]
    assert len(long_ids) == 60
    long = GenerationRequest(long_ids, 6, ignore_eos=True)
    expected = generate(cpu_model.backend, cpu_model.codec, long)
    batch = BatchGenerator(backend, max_batch=4, prefill_chunk=16)
    running = _submit(batch, cpu_model, short)
    batch.step()
    backend.calls.clear()
    joining = _submit(batch, cpu_model, long)
    for _ in range(4):
        batch.step()
    # 60 prompt tokens in chunks of 16, the running job decoding after each; then both decode.
    assert backend.calls == [
        ("prefill", 16), ("decode", 1), ("prefill", 16), ("decode", 1),
        ("prefill", 16), ("decode", 1), ("prefill", 12), ("decode", 2),
    ]  # fmt: skip
    while not batch.idle:
        batch.step()
    assert joining["error"] is None and running["error"] is None
    assert joining["result"].token_ids == expected.token_ids
    assert len(running["result"].token_ids) == 20


def test_a_job_cancelled_between_prompt_chunks_stops_there(cpu_model: LoadedModel) -> None:
    backend = RecordingBackend(cpu_model.backend)
    short = GenerationRequest(cpu_model.codec.encode_prompt("Count:"), 8, ignore_eos=True)
    long_ids = cpu_model.codec.encode_prompt("A long question about rivers. " * 12)[:48]
    assert len(long_ids) == 48
    batch = BatchGenerator(backend, max_batch=4, prefill_chunk=16)
    running = _submit(batch, cpu_model, short)
    batch.step()
    before = len(backend.calls)
    cancelled = _submit(
        batch, cpu_model, GenerationRequest(long_ids, 8), interrupt=lambda: "cancelled"
    )
    while not batch.idle:
        batch.step()
    assert cancelled["error"] is None
    assert cancelled["result"].finish_reason == "cancelled"
    assert cancelled["result"].token_ids == []
    prefills = [call for call in backend.calls[before:] if call[0] == "prefill"]
    assert prefills == [("prefill", 16)]  # the other 32 prompt tokens were never run
    assert running["error"] is None and len(running["result"].token_ids) == 8
