"""Continuous batching gives the same greedy tokens as one job at a time, with jobs joining a
running batch and leaving it at different steps, and long prompts prefilled in chunks between the
running jobs' steps; one row's fault ends only that row."""

from __future__ import annotations

from typing import Any

import pytest

from agent.backends.base import Backend, Logits, TokenIds
from agent.batching import BatchGenerator, StepReport, compacting_order
from agent.config import PREFILL_CHUNK
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
    batch: BatchGenerator[int] = BatchGenerator(model.backend, max_batch=4, prefill_chunk=chunk)

    def step() -> None:
        report = batch.step()
        for i, text in report.texts:
            streamed[i].append(text)
        for end in report.ended:
            results[end.key] = end.result

    def submit(i: int) -> None:
        batch.submit(SequenceRun(reqs[i], model.codec, model.backend.info.max_seq_len), i)

    submit(0)
    submit(1)
    for _ in range(3):
        step()
    submit(2)  # joins a batch that is 3 steps in
    step()
    submit(3)
    submit(4)  # waits: the batch is full until a row leaves
    steps = 0
    while not batch.idle:
        step()
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


class Driver:
    """Steps a batch and files each row's end under its key (a dict of `result` and `error`)."""

    def __init__(self, batch: BatchGenerator[int]) -> None:
        self.batch = batch
        self.outcomes: dict[int, dict[str, Any]] = {}
        self.texts: dict[int, list[str]] = {}

    def submit(self, model: LoadedModel, request: GenerationRequest, **kwargs: Any) -> int:
        key = len(self.outcomes)
        self.outcomes[key] = {}
        self.texts[key] = []
        run = SequenceRun(request, model.codec, model.backend.info.max_seq_len, **kwargs)
        self.batch.submit(run, key)
        return key

    def step(self) -> StepReport[int]:
        report = self.batch.step()
        for key, text in report.texts:
            self.texts[key].append(text)
        for end in report.ended:
            self.outcomes[end.key].update(result=end.result, error=end.error)
        return report

    def until_idle(self) -> None:
        steps = 0
        while not self.batch.idle:
            self.step()
            steps += 1
            assert steps < 1000


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
    driver = Driver(BatchGenerator(backend, max_batch=4, prefill_chunk=16))
    running = driver.outcomes[driver.submit(cpu_model, short)]
    driver.step()
    backend.calls.clear()
    joining = driver.outcomes[driver.submit(cpu_model, long)]
    for _ in range(4):
        driver.step()
    # 60 prompt tokens in chunks of 16, the running job decoding after each; then both decode.
    assert backend.calls == [
        ("prefill", 16), ("decode", 1), ("prefill", 16), ("decode", 1),
        ("prefill", 16), ("decode", 1), ("prefill", 12), ("decode", 2),
    ]  # fmt: skip
    driver.until_idle()
    assert joining["error"] is None and running["error"] is None
    assert joining["result"].token_ids == expected.token_ids
    assert len(running["result"].token_ids) == 20


def test_a_job_cancelled_between_prompt_chunks_stops_there(cpu_model: LoadedModel) -> None:
    backend = RecordingBackend(cpu_model.backend)
    short = GenerationRequest(cpu_model.codec.encode_prompt("Count:"), 8, ignore_eos=True)
    long_ids = cpu_model.codec.encode_prompt("A long question about rivers. " * 12)[:48]
    assert len(long_ids) == 48
    driver = Driver(BatchGenerator(backend, max_batch=4, prefill_chunk=16))
    running = driver.outcomes[driver.submit(cpu_model, short)]
    driver.step()
    before = len(backend.calls)
    cancelled = driver.outcomes[
        driver.submit(cpu_model, GenerationRequest(long_ids, 8), interrupt=lambda: "cancelled")
    ]
    driver.until_idle()
    assert cancelled["error"] is None
    assert cancelled["result"].finish_reason == "cancelled"
    assert cancelled["result"].token_ids == []
    prefills = [call for call in backend.calls[before:] if call[0] == "prefill"]
    assert prefills == [("prefill", 16)]  # the other 32 prompt tokens were never run
    assert running["error"] is None and len(running["result"].token_ids) == 8


class FailingRun(SequenceRun):
    """A run whose own bookkeeping breaks after `after` tokens (as a detokenizer or sampler bug
    would): the failure is this row's, not the batch's."""

    def __init__(self, *args: Any, after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after = after

    def accept(self, logits: Logits) -> bool:
        if len(self.tokens) >= self.after:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken byte in this row")
        return super().accept(logits)


def test_one_failing_row_ends_alone_and_the_others_finish_correctly(
    cpu_model: LoadedModel,
) -> None:
    reqs = [
        GenerationRequest(cpu_model.codec.encode_messages([{"role": "user", "content": text}]), 16)
        for text in PROMPTS[:4]
    ]
    alone = [generate(cpu_model.backend, cpu_model.codec, r) for r in reqs]
    driver = Driver(BatchGenerator(cpu_model.backend, max_batch=4))
    for i, request in enumerate(reqs):
        if i == 1:  # the second row fails after 3 tokens, mid-batch
            run = FailingRun(request, cpu_model.codec, cpu_model.backend.info.max_seq_len, after=3)
            driver.outcomes[1], driver.texts[1] = {}, []
            driver.batch.submit(run, 1)
        else:
            driver.submit(cpu_model, request)
    driver.until_idle()
    failed = driver.outcomes[1]
    assert failed["result"] is None and isinstance(failed["error"], AgentError)
    assert (
        failed["error"].code == "engine_error" and "UnicodeDecodeError" in failed["error"].message
    )
    for i in (0, 2, 3):
        got = driver.outcomes[i]
        assert got["error"] is None, got["error"]
        assert got["result"].token_ids == alone[i].token_ids, f"row {i} diverged"
        assert "".join(driver.texts[i]) == got["result"].text == alone[i].text
