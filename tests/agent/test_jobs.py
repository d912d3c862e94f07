import json

import pytest

from agent.jobs import InvalidPayload, JobRequest, RequestLimits, parse_cancel, parse_job

LIMITS = RequestLimits(max_payload_bytes=4096, max_tokens_limit=512, default_max_tokens=64)


def parse(data: object) -> JobRequest:
    return parse_job(json.dumps(data).encode(), LIMITS)


def refused(payload: bytes) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as info:
        parse_job(payload, LIMITS)
    return info.value


def test_minimal_prompt_job_gets_defaults() -> None:
    job = parse_job(b'{"id": "a1", "prompt": "hi"}', LIMITS)
    assert job.id == "a1" and job.prompt == "hi" and job.messages is None
    assert job.max_tokens == 64 and job.sampling.greedy and not job.stream
    assert job.stop == () and job.priority == 0 and job.deadline_ms is None


def test_null_optional_fields_mean_not_given() -> None:
    """Found by the fuzzer: `"priority": null` crashed the parser (an assert) instead of being
    answered; every optional field now reads null as absent."""
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                               "stream", "priority", "deadline_ms")}  # fmt: skip
    job = parse_job(json.dumps({"id": "n1", "prompt": "hi", **nulls}).encode(), LIMITS)
    assert job == parse_job(b'{"id": "n1", "prompt": "hi"}', LIMITS)
    assert refused(b'{"id": "n2", "prompt": null}').job_code == "invalid_request"


def test_full_messages_job() -> None:
    job = parse(
        {
            "id": "job:1.x-y_z",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "max_tokens": 512,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 3,
            "stop": ["\n", "END"],
            "stream": True,
            "priority": 5,
            "deadline_ms": 1000,
        }
    )
    assert job.messages == (("system", "s"), ("user", "u"))
    assert job.sampling.temperature == 0.7 and job.sampling.top_k == 40 and job.sampling.seed == 3
    assert job.stop == ("\n", "END") and job.stream and job.priority == 5


@pytest.mark.parametrize(
    ("payload", "code", "has_id"),
    [
        (b"not json", "invalid_json", False),
        (b"\xff\xfe\x00", "invalid_json", False),
        (b'{"id": "a", "prompt": NaN}', "invalid_json", False),
        (b"[1, 2]", "invalid_request", False),
        (b'{"prompt": "x"}', "invalid_request", False),
        (b'{"id": "has space", "prompt": "x"}', "invalid_request", False),
        (b'{"id": "a/b", "prompt": "x"}', "invalid_request", False),
        (b'{"id": 5, "prompt": "x"}', "invalid_request", False),
        (json.dumps({"id": "x" * 129, "prompt": "x"}).encode(), "invalid_request", False),
        (b'{"id": "a"}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "messages": []}', "invalid_request", True),
        (b'{"id": "a", "prompt": ""}', "invalid_request", True),
        (b'{"id": "a", "prompt": 3}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "bogus": 1}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "max_tokens": 0}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "max_tokens": 513}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "max_tokens": 10.5}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "max_tokens": true}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "max_tokens": 1e400}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "temperature": 2.5}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "temperature": "hot"}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "top_p": 0}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "top_k": -1}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "seed": -3}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "seed": 99999999999999999999999}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "stop": [""]}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "stream": "yes"}', "invalid_request", True),
        (b'{"id": "a", "prompt": "x", "deadline_ms": 0}', "invalid_request", True),
        (b'{"id": "a", "messages": [{"role": "user"}]}', "invalid_request", True),
        (b'{"id": "a", "messages": [{"role": "god", "content": "x"}]}', "invalid_request", True),
        (b'{"id": "a", "messages": "hello"}', "invalid_request", True),
    ],
)
def test_refusals_carry_the_contract_code(payload: bytes, code: str, has_id: bool) -> None:
    error = refused(payload)
    assert error.job_code == code
    assert (error.job_id is not None) == has_id
    assert error.message  # a person can read why


def test_huge_integer_and_deep_nesting_are_invalid_json_not_crashes() -> None:
    assert refused(b'{"id": "a", "prompt": "x", "seed": ' + b"9" * 5000 + b"}").job_code in (
        "invalid_json",
        "invalid_request",
    )
    big = RequestLimits(max_payload_bytes=10**6)
    with pytest.raises(InvalidPayload) as info:
        parse_job(b"[" * 100_000 + b"]" * 100_000, big)
    assert info.value.job_code == "invalid_json"


def test_oversized_payload_is_refused_before_parsing() -> None:
    payload = json.dumps({"id": "a", "prompt": "x" * 5000}).encode()
    assert refused(payload).job_code == "invalid_request"


def test_single_stop_string_is_accepted() -> None:
    assert parse({"id": "a", "prompt": "x", "stop": "END"}).stop == ("END",)  # type: ignore[attr-defined]


def test_cancel_payload() -> None:
    assert parse_cancel(b'{"id": "job-1"}') == "job-1"
    for bad in (b"{}", b'{"id": "a b"}', b'{"id": "a", "x": 1}', b"nope"):
        with pytest.raises(InvalidPayload):
            parse_cancel(bad)
