"""Continuous batching gives the same greedy tokens as one job at a time, with jobs joining a
running batch and leaving it at different steps."""

from __future__ import annotations

import pytest

from agent.batching import BatchGenerator, compacting_order
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


def test_batched_greedy_equals_one_at_a_time(model: LoadedModel) -> None:
    reqs = requests(model)
    alone = [generate(model.backend, model.codec, r) for r in reqs]
    results: dict[int, GenerationResult | None] = {}
    streamed: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    batch = BatchGenerator(model.backend, max_batch=4)

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
