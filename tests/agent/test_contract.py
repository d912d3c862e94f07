"""The contract package (agent/contract): every type survives its own serialiser and parser, the
fleet and the agent produce the same payloads through it, the build's manifest writer writes what
the agent's bundle reader reads, and the package imports nothing outside the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import agent.contract.payload
import agent.jobs
import agent.ota.command
from agent import events
from agent.bundle import open_bundle, read_manifest
from agent.contract import bundle as layout
from agent.contract.errors import ContractError
from agent.contract.events import (
    Accepted,
    Delta,
    DeviceStatus,
    Done,
    EngineInfo,
    JobFailed,
    Timing,
    Usage,
    parse_event,
    parse_status,
)
from agent.contract.jobs import (
    MAX_PRIORITY,
    FunctionCall,
    FunctionSpec,
    JobSpec,
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    cancel_payload,
    parse_cancel,
    parse_job_payload,
    parse_job_spec,
)
from agent.contract.ota import (
    FINAL_STATES,
    OTA_STATES,
    OtaStatus,
    UpdateCommand,
    parse_ota_status,
    parse_update_command,
    update_command_from_dict,
)
from agent.contract.payload import encode
from agent.jobs import InvalidPayload, RequestLimits, parse_job
from agent.ota.command import parse_update_command as agent_parse_update_command
from agent.ota.errors import OtaError
from agent.ota.store import OtaRecord, OtaStore
from build_engine.bundle_writer import write_manifest as build_write_manifest
from fleet import resubmit, update
from fleet.prompt import BadJob, PromptJob

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32
ENGINE = EngineInfo("smollm2-135m", "1.2", "fp32", "onnxruntime")
ARCH = layout.Arch("llama", 2, 2, 8, 16, 10, 64)

FULL_JOB = JobSpec(
    id="job-1",
    messages=(
        Message("system", "be brief"),
        Message("user", (TextPart("what is"), TextPart("the weather?"))),
        Message(
            "assistant",
            None,
            tool_calls=(ToolCall("call-1", FunctionCall("weather", '{"city": "Oslo"}')),),
        ),
        Message("tool", "rain", tool_call_id="call-1"),
    ),
    max_tokens=64,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=7,
    stop=("\n\n", "END"),
    stream=True,
    priority=-3,
    deadline_ms=5000,
    response_format=ResponseFormat(
        "json_schema",
        JsonSchemaFormat("answer", {"type": "object", "required": ["a"]}, strict=True),
    ),
    tools=(
        Tool(FunctionSpec("weather", "the weather in a city", {"type": "object"})),
        Tool(FunctionSpec("time")),
    ),
    tool_choice=NamedToolChoice("weather"),
    reasoning="separate",
)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        FULL_JOB,
        JobSpec(id="p", prompt="once upon a time"),
        replace(FULL_JOB, tool_choice="required", response_format=ResponseFormat("json_object")),
        replace(FULL_JOB, tool_choice="auto", reasoning="inline", tools=()),
    ],
    ids=["full", "minimal", "required", "auto"],
)
def test_job_request_round_trips(job: JobSpec) -> None:
    payload = job.to_payload()
    assert parse_job_spec(payload) == job
    assert parse_job_payload(encode(payload), 256 * 1024) == job  # through the bytes as well
    assert json.loads(encode(payload)) == payload
    assert job.checked() == job


def test_job_request_payload_has_the_design_shapes() -> None:
    payload = FULL_JOB.to_payload()
    assert payload["messages"][1]["content"] == [
        {"type": "text", "text": "what is"},
        {"type": "text", "text": "the weather?"},
    ]
    assert payload["messages"][2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }
    assert payload["messages"][3] == {"role": "tool", "tool_call_id": "call-1", "content": "rain"}
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert payload["tools"][1] == {"type": "function", "function": {"name": "time"}}
    assert payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "required": ["a"]},
            "strict": True,
        },
    }
    assert JobSpec(id="p", prompt="x").to_payload() == {"id": "p", "prompt": "x"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "text", "x": 1}}, "no other key"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
        ({"tools": [{"type": "function", "function": {"name": "t"}}] * 2}, "twice"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]}, "64"),
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "lacks"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"reasoning": "hidden"}, "reasoning"),
        ({"messages": [{"role": "user", "content": None}]}, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "content[0]"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "name"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}, "tool_calls"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 3}]}, "tool_call_id"),
    ],
)
def test_second_revision_fields_are_validated(change: dict[str, Any], fragment: str) -> None:
    body = {"id": "j", "messages": [{"role": "user", "content": "hi"}]} | change
    with pytest.raises(ContractError) as info:
        parse_job_spec(body)
    assert info.value.code == "invalid_request" and info.value.job_id == "j"
    assert fragment in info.value.message


def test_cancel_round_trips() -> None:
    assert parse_cancel(encode(cancel_payload("job-9"))) == "job-9"
    with pytest.raises(ContractError):
        cancel_payload("not an id")


@pytest.mark.parametrize(
    "event",
    [
        Accepted("j", 3),
        Accepted("j", 0, device="orin-01"),
        Accepted("j", 1, restarted=True),
        Delta("j", 0, text="Hel"),
        Delta("j", 1, reasoning="hmm"),
        Done(
            "j",
            "Hello",
            "stop",
            Usage(5, 2),
            Timing(1.5, 20.25, 80.0, 33.33),
            ENGINE,
            "orin-01",
        ),
        Done(
            "j",
            "",
            "tool_calls",
            Usage(5, 9, cached_tokens=4, reasoning_tokens=3),
            Timing(0.0, 1.0, 2.0, 3.0),
            None,
            "orin-01",
            reasoning="think",
            tool_calls=(ToolCall("c1", FunctionCall("weather", "{}")),),
            restarted=True,
        ),
        JobFailed("j", "queue_full", "the queue is full"),
        JobFailed(None, "invalid_json", "payload is not valid JSON"),
    ],
)
def test_events_round_trip(event: Accepted | Delta | Done | JobFailed) -> None:
    payload = event.to_payload()
    assert payload["event"] in ("accepted", "delta", "done", "error") and "id" in payload
    assert parse_event(json.loads(encode(payload))) == event


def test_a_delta_carries_exactly_one_stream() -> None:
    for text, reasoning in ((None, None), ("a", "b")):
        with pytest.raises(ContractError):
            Delta("j", 0, text, reasoning)


def test_malformed_events_are_refused() -> None:
    bad: Any
    for bad in (
        [],
        {"id": "j", "event": "progress"},
        {"id": 3, "event": "accepted", "queue_position": 1},
        {"id": "j", "event": "accepted"},
        {"id": "j", "event": "done", "text": "x", "finish_reason": "bored"},
        {"id": "j", "event": "error"},
    ):
        with pytest.raises(ContractError):
            parse_event(bad)


def test_status_round_trips() -> None:
    for status in (
        DeviceStatus("online", "0.1.0", ENGINE, "2026-01-02T03:04:05.000Z"),
        DeviceStatus("offline", "0.1.0", None, "2026-01-02T03:04:05.000Z"),
    ):
        assert parse_status(status.to_payload()) == status
    with pytest.raises(ContractError):
        parse_status({"state": "asleep"})


def test_update_command_round_trips() -> None:
    for command in (
        UpdateCommand("up-1", "https://h/b.tar", SHA, 10, "2"),
        UpdateCommand("up-2", "http://h:8000/b.tar", SHA, 10, "1.0", allow_downgrade=True),
    ):
        assert parse_update_command(encode(command.to_payload()), 100) == command
        assert update_command_from_dict(command.to_json()) == command  # the persisted form
    plain = UpdateCommand("up-1", "https://h/b.tar", SHA, 10, "2").to_payload()
    assert plain == {"id": "up-1", "url": "https://h/b.tar", "sha256": SHA, "size": 10,
                     "version": "2"}  # fmt: skip  # no allow_downgrade for older agents


@pytest.mark.parametrize(
    "change",
    [
        {"id": "a b"},
        {"url": "file:///etc/passwd"},
        {"url": "http:///no-host"},
        {"sha256": "xyz"},
        {"size": 0},
        {"size": True},
        {"size": 101},
        {"version": ""},
        {"version": "v" * 65},
        {"allow_downgrade": "yes"},
        {"extra": 1},
    ],
)
def test_bad_update_commands_are_refused(change: dict[str, Any]) -> None:
    body = {"id": "up-1", "url": "http://h/b.tar", "sha256": SHA, "size": 10, "version": "2"}
    with pytest.raises(ContractError) as info:
        update_command_from_dict(body | change, max_bytes=100)
    assert info.value.code == "bad_command"


def test_ota_status_round_trips() -> None:
    for status in (
        OtaStatus("up-1", "downloading", "2", 0.5, None),
        OtaStatus("up-1", "failed", "2", None, {"code": "downgrade", "message": "not newer"}),
    ):
        assert parse_ota_status(status.to_payload()) == status
    assert FINAL_STATES <= OTA_STATES
    with pytest.raises(ContractError):
        parse_ota_status({"id": "up-1", "state": "switching"})  # internal, never published


# --- the fleet and the agent speak through the same types ----------------------------------------


def test_fleet_job_payload_is_what_the_agent_reads() -> None:
    for job in (
        PromptJob("hello", "dev", max_tokens=8, system="be brief"),
        PromptJob("once", None, raw=True, stream=False, temperature=0.5),
    ):
        payload = job.payload("job-7")
        request = parse_job(encode(payload), RequestLimits())
        assert request.spec is not None and request.spec.to_payload() == payload
        assert (request.max_tokens, request.stream) == (job.max_tokens, job.stream)
        assert request.sampling.temperature == job.temperature
        expected = (("system", "be brief"), ("user", "hello")) if not job.raw else None
        assert request.messages == expected and request.prompt == (job.text if job.raw else None)


def test_the_fleet_does_not_send_a_job_a_device_would_refuse() -> None:
    for job, job_id, named in (
        (PromptJob("x", "dev", max_tokens=0), "j", "max_tokens"),
        (PromptJob("x", "dev", temperature=3.0), "j", "temperature"),
        (PromptJob("", "dev", raw=True), "j", "prompt"),
        (PromptJob("x", "dev"), "not an id", "id"),
    ):
        with pytest.raises(BadJob) as info:
            job.payload(job_id)
        assert info.value.code == "invalid_request" and f"`{named}`" in info.value.message


def test_fleet_update_command_is_what_the_agent_parses_and_stores(tmp_path: Path) -> None:
    for allow in (False, True):
        sent = update.make_command("up-1", "http://h/b.tar", SHA.upper(), 10, "2", allow)
        received = agent_parse_update_command(encode(sent.to_payload()), max_bytes=100)
        assert received == sent and received.to_payload() == sent.to_payload()
        store = OtaStore(tmp_path / f"state-{allow}.json", max_bytes=100)
        store.save(OtaRecord(received, "downloading"))
        loaded = store.load()
        assert loaded is not None and loaded.command == sent
    with pytest.raises(update.UpdateError) as fleet_refusal:
        update.make_command("up-1", "ftp://h/b.tar", SHA, 10, "2")
    with pytest.raises(OtaError) as agent_refusal:
        agent_parse_update_command(encode({**sent.to_payload(), "url": "ftp://h/b.tar"}), 100)
    assert fleet_refusal.value.code == agent_refusal.value.code == "bad_command"


def test_one_definition_of_each_contract_constant() -> None:
    assert update.UpdateCommand is UpdateCommand and update.OtaStatus is OtaStatus
    assert update.SHA256_RE is agent.contract.payload.SHA256_RE
    assert update.FINAL_STATES is FINAL_STATES and update.OTA_STATES is OTA_STATES
    assert resubmit.MAX_PRIORITY is MAX_PRIORITY == 1000
    assert agent.jobs.MAX_PRIORITY is MAX_PRIORITY
    assert agent.jobs.JOB_ID_RE is agent.contract.payload.JOB_ID_RE
    assert agent.ota.command.UpdateCommand is UpdateCommand


def test_agent_events_are_the_contract_payloads() -> None:
    # First-revision payloads, key for key (and byte for byte): what every existing reader expects.
    assert (
        encode(events.accepted("j", 2)) == b'{"id": "j", "event": "accepted", "queue_position": 2}'
    )
    assert events.delta("j", 4, "x") == {"id": "j", "event": "delta", "seq": 4, "text": "x"}
    assert events.error(None, "invalid_json", "m") == {
        "id": None,
        "event": "error",
        "error": {"code": "invalid_json", "message": "m"},
    }
    done = events.done(
        "j",
        text="Hi",
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=1,
        queue_ms=1.234,
        ttft_ms=5.678,
        total_ms=9.999,
        tokens_per_s=12.345,
        engine=ENGINE.to_payload(),
        device="d",
    )
    assert list(done) == [
        "id", "event", "text", "finish_reason", "usage", "timing", "engine", "device",
    ]  # fmt: skip
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}
    assert done["timing"] == {"queue_ms": 1.23, "ttft_ms": 5.68, "total_ms": 10.0,
                              "tokens_per_s": 12.35}  # fmt: skip
    parsed = parse_event(done)
    assert isinstance(parsed, Done) and parsed.engine == ENGINE and parsed.to_payload() == done
    status = events.status("online", "0.1.0", ENGINE.to_payload(), "t")
    assert status == {"state": "online", "agent_version": "0.1.0",
                      "engine": ENGINE.to_payload(), "since": "t"}  # fmt: skip
    # The fleet's own final verdict is a contract error event too.
    assert parse_event(resubmit._gave_up("j", "no one")) == JobFailed("j", "no_device", "no one")


def test_agent_refuses_second_revision_features_it_cannot_honour() -> None:
    base = {"id": "j", "messages": [{"role": "user", "content": "hi"}]}
    for change, named in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "t"}}]}, "tools"),
        ({"reasoning": "separate"}, "reasoning"),
        (
            {"messages": [{"role": "tool", "content": "rain", "tool_call_id": "c"}]},
            "tool_call_id",
        ),
    ):
        with pytest.raises(InvalidPayload) as info:
            parse_job(encode(base | change), RequestLimits())
        assert info.value.job_code == "invalid_request" and info.value.job_id == "j"
        assert named in info.value.message
    # What it does anyway is accepted: plain text output, no tools, thinking left inline.
    fine = base | {
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "reasoning": "inline",
    }
    assert parse_job(encode(fine), RequestLimits()).messages == (("user", "hi"),)
    parts = {"id": "j", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}  # fmt: skip
    assert parse_job(encode(parts), RequestLimits()).messages == (("user", "a\nb"),)


# --- the manifest: one writer, one reader --------------------------------------------------------


def _bundle_files(root: Path) -> Path:
    root.mkdir()
    (root / layout.ONNX_MODEL_FILE).write_bytes(b"graph" * 100)
    (root / layout.TOKENIZER_FILE).write_bytes(b"{}")
    (root / layout.GOLDEN_FILE).write_bytes(b'{"canaries": []}')
    (root / "sub").mkdir()
    (root / "sub" / "extra.bin").write_bytes(b"\x00\x01")
    return root


def test_manifest_round_trips(tmp_path: Path) -> None:
    root = _bundle_files(tmp_path / "b")
    manifest = layout.new_manifest(
        root,
        name="tiny",
        version="1.0",
        source={"model": "x", "sha256": SHA},
        arch=ARCH,
        backend="onnxruntime",
        precision="fp32",
        target=None,
        quality={"reference": "pytorch-fp32"},
        tokenizer={"eos_token_ids": [2]},
        build={"tool": "test"},
    )
    written = layout.write_manifest(root, manifest)
    assert written == manifest and written.raw == manifest.to_payload()
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "golden.json", "sub/extra.bin"}
    assert manifest.total_bytes == 500 + 2 + 16 + 2
    data = (root / layout.MANIFEST_FILE).read_bytes()
    assert data == layout.manifest_bytes(manifest) and data.endswith(b"}\n")
    opened = open_bundle(root)  # the agent's reader: every file hashed against the manifest
    assert opened.manifest == manifest and opened.manifest.engine_info() == {
        "name": "tiny", "version": "1.0", "precision": "fp32", "backend": "onnxruntime",
    }  # fmt: skip


def test_the_writer_refuses_a_manifest_the_reader_would_refuse(tmp_path: Path) -> None:
    root = _bundle_files(tmp_path / "b")
    manifest = layout.new_manifest(
        root, name="tiny", version="1", source={}, arch=ARCH, backend="onnxruntime",
        precision="fp8", target=None, quality={}, tokenizer={}, build={},
    )  # fmt: skip
    with pytest.raises(ContractError) as info:
        layout.write_manifest(root, manifest)
    assert info.value.code == "bad_manifest" and not (root / layout.MANIFEST_FILE).exists()


def test_export_writer_is_read_by_the_agent(tmp_path: Path) -> None:
    root = _bundle_files(tmp_path / "b")
    written = build_write_manifest(
        root,
        name="tiny",
        version="3",
        source={"model": "x"},
        arch=ARCH,
        precision="int8",
        quality={"gate": "passed"},
        tokenizer={"eos_token_ids": [1, 2]},
        build={"tool": "edge-build", "target": "cpu"},
    )
    assert list(written) == [
        "format", "name", "version", "created", "source", "arch", "backend", "precision",
        "target", "files", "quality", "tokenizer", "build",
    ]  # fmt: skip
    manifest = open_bundle(root).manifest
    assert manifest.raw == written and manifest.backend == "onnxruntime" and manifest.target is None
    assert (manifest.arch, manifest.precision, manifest.build["target"]) == (ARCH, "int8", "cpu")


def test_compile_writer_is_read_by_the_agent(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from agent.backends.tensorrt.profiles import ProfileLimits
    from agent.target import DeviceTarget
    from build_engine.compile import CompileOptions, _manifest

    source_root = _bundle_files(tmp_path / "onnx")
    build_write_manifest(
        source_root, name="tiny", version="3", source={"model": "x"}, arch=ARCH,
        precision="fp16", quality={"gate": "passed"}, tokenizer={"eos_token_ids": [2]},
        build={"target": "orin"},
    )  # fmt: skip
    staging = tmp_path / "engine"
    staging.mkdir()
    (staging / layout.ENGINE_FILE).write_bytes(b"plan")
    (staging / layout.TOKENIZER_FILE).write_bytes(b"{}")
    target = DeviceTarget(gpu="Orin", compute_capability="8.7", tensorrt="10.3.0.30")
    written = _manifest(
        staging,
        open_bundle(source_root),
        CompileOptions(version="3-trt"),
        target,
        ProfileLimits(max_batch=4, max_prefill=512, max_context=32),
        quality={"golden_agreement": 1.0},
        build={"tool": "edge-build compile"},
    )
    manifest = read_manifest(staging)
    assert manifest.raw == written and open_bundle(staging).manifest == manifest
    assert (manifest.backend, manifest.version, manifest.precision) == ("tensorrt", "3-trt", "fp16")
    assert manifest.arch == replace(ARCH, max_seq_len=32)
    assert manifest.target == target.to_manifest()
    assert manifest.quality["onnx_bundle"] == {"gate": "passed"}


# --- a leaf --------------------------------------------------------------------------------------


def test_the_contract_imports_only_the_standard_library() -> None:
    """The error root it derives from is held to the same rule: it imports nothing but the
    standard library either (else the list below would name what it pulled in)."""
    script = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import agent.contract\n"
        "import agent.contract.bundle, agent.contract.events, agent.contract.jobs\n"
        "import agent.contract.ota, agent.contract.payload, agent.contract.errors\n"
        "new = sorted(set(sys.modules) - before)\n"
        "ours = ('agent', 'agent.errors')  # the package, and the tools' stdlib-only error root\n"
        "outside = [m for m in new if m not in ours and not m.startswith('agent.contract')\n"
        "           and m.split('.')[0] not in sys.stdlib_module_names]\n"
        "print(len(new), outside)\n"
    )
    # -S: no site-packages at all, so a third-party import would fail outright as well.
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    count, outside = result.stdout.split(" ", 1)
    assert int(count) > 7  # the package's own modules were imported: the check saw them
    assert outside.strip() == "[]", outside
