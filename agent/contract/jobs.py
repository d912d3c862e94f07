"""The job request (DESIGN.md, "Job request", both revisions) and the cancel request, as types.

`JobSpec` is the request as it travels: what the sender asked, a field it did not send is None.
`parse_job_spec` is the one validator, used by the agent on every payload it receives;
`JobSpec.to_payload` is the one serialiser, used by the fleet (and a gateway) to send one. Defaults
(`max_tokens` 256, greedy, ...) are the receiver's business: the agent applies its configured ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from agent.contract.errors import INVALID_REQUEST, ContractError
from agent.contract.payload import JOB_ID_RE, check_size, decode_json_object

Role = Literal["system", "user", "assistant", "tool"]
ROLES: Final[frozenset[str]] = frozenset(get_args(Role))
ResponseType = Literal["text", "json_object", "json_schema"]
RESPONSE_TYPES: Final[frozenset[str]] = frozenset(get_args(ResponseType))
ToolChoiceMode = Literal["auto", "none", "required"]
TOOL_CHOICE_MODES: Final[frozenset[str]] = frozenset(get_args(ToolChoiceMode))
Reasoning = Literal["separate", "inline"]
REASONING_MODES: Final[frozenset[str]] = frozenset(get_args(Reasoning))

MAX_STOP_STRINGS: Final = 4
MAX_STOP_CHARS: Final = 256
MAX_MESSAGES: Final = 256
MAX_TOOLS: Final = 64
MAX_PRIORITY: Final = 1000  # `priority` is an integer in -MAX_PRIORITY..MAX_PRIORITY
MAX_DEADLINE_MS: Final = 24 * 3600 * 1000
MAX_SEED: Final = 2**63 - 1
MAX_TOP_K: Final = 2**31 - 1
DEFAULT_MAX_TOKENS: Final = 256
FUNCTION_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
MAX_CANCEL_BYTES: Final = 1024  # {"id": <128 characters>} with room for whitespace

# Fields of the first revision, then those the second revision added.
FIRST_REVISION_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "id",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "priority",
        "deadline_ms",
    }
)
SECOND_REVISION_FIELDS: Final[frozenset[str]] = frozenset(
    {"response_format", "tools", "tool_choice", "reasoning"}
)
FIELDS: Final[frozenset[str]] = FIRST_REVISION_FIELDS | SECOND_REVISION_FIELDS


# --- the parts of a request ---------------------------------------------------------------------


@dataclass(frozen=True)
class TextPart:
    """One `{"type": "text", "text"}` part of a message's content (OpenAI's shape)."""

    text: str

    def to_payload(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # a JSON document, as a string (OpenAI's shape)

    def to_payload(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: in an assistant message, and in a `done` event's `tool_calls`."""

    id: str
    function: FunctionCall

    def to_payload(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": self.function.to_payload()}


@dataclass(frozen=True)
class Message:
    """A chat turn. `content` is a string, a tuple of text parts, or None (only on an assistant
    turn that has `tool_calls`)."""

    role: Role
    content: str | tuple[TextPart, ...] | None
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns only
    tool_call_id: str | None = None  # tool turns only: the call this is the answer to

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    @property
    def is_plain(self) -> bool:
        """A first-revision message: `{"role", "content"}` with string content."""
        return isinstance(self.content, str) and not self.tool_calls and self.tool_call_id is None

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"role": self.role}
        if self.tool_call_id is not None:
            body["tool_call_id"] = self.tool_call_id
        if isinstance(self.content, tuple):
            body["content"] = [part.to_payload() for part in self.content]
        else:
            body["content"] = self.content
        if self.tool_calls:
            body["tool_calls"] = [call.to_payload() for call in self.tool_calls]
        return body


@dataclass(frozen=True)
class JsonSchemaFormat:
    name: str
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            body["description"] = self.description
        if self.schema is not None:
            body["schema"] = self.schema
        if self.strict is not None:
            body["strict"] = self.strict
        return body


@dataclass(frozen=True)
class ResponseFormat:
    type: ResponseType
    json_schema: JsonSchemaFormat | None = None  # set exactly when type is "json_schema"

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            body["json_schema"] = self.json_schema.to_payload()
        return body


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            body["description"] = self.description
        if self.parameters is not None:
            body["parameters"] = self.parameters
        return body


@dataclass(frozen=True)
class Tool:
    function: FunctionSpec

    def to_payload(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.to_payload()}


@dataclass(frozen=True)
class NamedToolChoice:
    """`{"type": "function", "function": {"name"}}`: the model must call this function."""

    name: str

    def to_payload(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name}}


ToolChoice = ToolChoiceMode | NamedToolChoice


# --- the request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """A job request as sent: exactly one of `prompt` or `messages`; None = not sent."""

    id: str
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stream: bool | None = None
    priority: int | None = None
    deadline_ms: int | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    reasoning: Reasoning | None = None

    def to_payload(self) -> dict[str, Any]:
        """The JSON object to publish (fields left None are not sent)."""
        body: dict[str, Any] = {"id": self.id}
        if self.prompt is not None:
            body["prompt"] = self.prompt
        if self.messages is not None:
            body["messages"] = [m.to_payload() for m in self.messages]
        scalars = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop) if self.stop is not None else None,
            "stream": self.stream,
            "priority": self.priority,
            "deadline_ms": self.deadline_ms,
            "reasoning": self.reasoning,
        }
        body.update({key: value for key, value in scalars.items() if value is not None})
        if self.response_format is not None:
            body["response_format"] = self.response_format.to_payload()
        if self.tools is not None:
            body["tools"] = [tool.to_payload() for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            body["tool_choice"] = self.tool_choice.to_payload()
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return body

    def checked(self, max_tokens_limit: int | None = None) -> JobSpec:
        """This request, validated as a device will validate it (a sender's check before it
        publishes). Raises ContractError."""
        return parse_job_spec(self.to_payload(), max_tokens_limit)


def _bad(message: str) -> ContractError:
    return ContractError(INVALID_REQUEST, message)


def parse_job_payload(
    payload: bytes, max_payload_bytes: int, max_tokens_limit: int | None = None
) -> JobSpec:
    """Validate one job payload (bytes). Raises ContractError; its `job_id` is set when the
    payload had a usable id."""
    check_size(payload, max_payload_bytes, "payload")
    return parse_job_spec(decode_json_object(payload), max_tokens_limit)


def parse_job_spec(data: dict[str, Any], max_tokens_limit: int | None = None) -> JobSpec:
    """Validate a decoded job request. `max_tokens_limit` is the receiver's cap (None: any
    positive integer). Raises ContractError with the contract's code and a usable `job_id`."""
    job_id = data.get("id")
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise _bad("`id` is required: 1-128 characters of A-Za-z0-9._:-")
    try:
        return _parse_fields(data, job_id, max_tokens_limit)
    except ContractError as exc:
        raise ContractError(exc.code, exc.message, job_id) from None


def _int_field(data: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"`{key}` must be an integer from {lo} to {hi}")
    return value


def _float_field(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"`{key}` must be a number")
    try:
        number = float(value)  # an integer beyond float's range raises OverflowError
    except OverflowError:
        raise _bad(f"`{key}` is out of range") from None
    if not math.isfinite(number):
        raise _bad(f"`{key}` must be a finite number")
    return number


def _parse_fields(data: dict[str, Any], job_id: str, max_tokens_limit: int | None) -> JobSpec:
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(map(repr, unknown[:8]))}")
    prompt, messages = _parse_input(data)
    # An optional field sent as JSON null means "not given" (what many JSON clients send for an
    # unset value), the same for every field, rather than an error for some and a crash for none.
    data = {key: value for key, value in data.items() if value is not None}
    max_tokens = _int_field(data, "max_tokens", 1, max_tokens_limit or 2**31 - 1)
    temperature = _float_field(data, "temperature")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise _bad("`temperature` must be from 0 to 2 (0 = greedy)")
    top_p = _float_field(data, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise _bad("`top_p` must be greater than 0 and at most 1")
    top_k = _int_field(data, "top_k", 0, MAX_TOP_K)
    seed = _int_field(data, "seed", 0, MAX_SEED)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("`stream` must be true or false")
    priority = _int_field(data, "priority", -MAX_PRIORITY, MAX_PRIORITY)
    deadline_ms = _int_field(data, "deadline_ms", 1, MAX_DEADLINE_MS)
    stop = _parse_stop(data.get("stop"))
    response_format = _parse_response_format(data.get("response_format"))
    tools = _parse_tools(data.get("tools"))
    tool_choice = _parse_tool_choice(data.get("tool_choice"), tools)
    reasoning = data.get("reasoning")
    if reasoning is not None and reasoning not in REASONING_MODES:
        raise _bad('`reasoning` must be "separate" or "inline"')
    return JobSpec(
        id=job_id,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        stream=stream,
        priority=priority,
        deadline_ms=deadline_ms,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        reasoning=reasoning,
    )


def _parse_input(data: dict[str, Any]) -> tuple[str | None, tuple[Message, ...] | None]:
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise _bad("give exactly one of `prompt` (a string) or `messages` (a list)")
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("`prompt` must be a non-empty string")
        return prompt, None
    raw = data["messages"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MESSAGES:
        raise _bad(f"`messages` must be a list of 1 to {MAX_MESSAGES} messages")
    return None, tuple(_parse_message(index, message) for index, message in enumerate(raw))


_MESSAGE_KEYS: Final[dict[str, frozenset[str]]] = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}


def _parse_message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not {"role", "content"} <= set(message):
        raise _bad(f"{where} must be an object with `role` and `content`")
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:  # str first: a list role is unhashable
        raise _bad(f"{where}.role must be one of {', '.join(sorted(ROLES))}")
    extra = sorted(set(message) - _MESSAGE_KEYS[role])
    if extra:
        allowed = ", ".join(f"`{key}`" for key in sorted(_MESSAGE_KEYS[role]))
        raise _bad(f"{where}: a {role} message has only {allowed}, not {', '.join(extra)}")
    tool_calls = _parse_tool_calls(where, message.get("tool_calls"))
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None and (not isinstance(tool_call_id, str) or not tool_call_id):
        raise _bad(f"{where}.tool_call_id must be a non-empty string")
    content = _parse_content(where, message["content"], allow_null=bool(tool_calls))
    return Message(role, content, tool_calls, tool_call_id)  # type: ignore[arg-type]


def _parse_content(
    where: str, content: Any, *, allow_null: bool
) -> str | tuple[TextPart, ...] | None:
    if isinstance(content, str):
        return content
    if content is None and allow_null:
        return None
    if isinstance(content, list) and content:
        parts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or set(part) != {"type", "text"}
                or part["type"] != "text"
                or not isinstance(part["text"], str)
            ):
                raise _bad(f'{where}.content[{index}] must be {{"type": "text", "text": "..."}}')
            parts.append(TextPart(part["text"]))
        return tuple(parts)
    raise _bad(
        f"{where}.content must be a string or a list of text parts"
        + (" (or null with tool_calls)" if allow_null else "")
    )


def _parse_tool_calls(where: str, raw: Any) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise _bad(f"{where}.tool_calls must be a non-empty list")
    return tuple(parse_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(raw))


def parse_tool_call(raw: Any, where: str = "tool_call") -> ToolCall:
    """`{"id", "type": "function", "function": {"name", "arguments"}}`."""
    shape = f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}'
    if not isinstance(raw, dict) or set(raw) != {"id", "type", "function"}:
        raise _bad(shape)
    function = raw["function"]
    if (
        not isinstance(raw["id"], str)
        or not raw["id"]
        or raw["type"] != "function"
        or not isinstance(function, dict)
        or set(function) != {"name", "arguments"}
        or not isinstance(function["name"], str)
        or not isinstance(function["arguments"], str)
    ):
        raise _bad(shape)
    return ToolCall(raw["id"], FunctionCall(function["name"], function["arguments"]))


def _parse_stop(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            f"`stop` must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters"
        )
    return tuple(stops)


def _parse_response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kinds = " | ".join(f'{{"type": "{kind}"}}' for kind in sorted(RESPONSE_TYPES))
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise _bad(f"`response_format` must be one of {kinds}")
    kind = raw["type"]
    if kind not in RESPONSE_TYPES:
        raise _bad(f"`response_format.type` {kind[:32]!r} is not one of {kinds}")
    if kind != "json_schema":
        if set(raw) != {"type"}:
            raise _bad(f'`response_format` {{"type": "{kind}"}} takes no other key')
        return ResponseFormat(kind)  # type: ignore[arg-type]
    spec = raw.get("json_schema")
    if set(raw) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise _bad('`response_format` json_schema needs `json_schema`: {"name", "schema", ...}')
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    name, schema = spec.get("name"), spec.get("schema")
    strict, description = spec.get("strict"), spec.get("description")
    if (
        extra
        or not isinstance(name, str)
        or not FUNCTION_NAME_RE.match(name)
        or (schema is not None and not isinstance(schema, dict))
        or (strict is not None and not isinstance(strict, bool))
        or (description is not None and not isinstance(description, str))
    ):
        raise _bad(
            '`response_format.json_schema` is {"name" (1-64 of A-Za-z0-9_-), "schema" '
            '(an object), "strict" (a boolean), "description"}'
            + (f"; unknown key(s) {', '.join(extra)}" if extra else "")
        )
    return ResponseFormat("json_schema", JsonSchemaFormat(name, schema, strict, description))


def _parse_tools(raw: Any) -> tuple[Tool, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise _bad(f"`tools` must be a list of up to {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or set(tool) != {"type", "function"}:
            raise _bad(f'{where} must be {{"type": "function", "function": {{...}}}}')
        function = tool["function"]
        if tool["type"] != "function" or not isinstance(function, dict):
            raise _bad(f'{where} must be {{"type": "function", "function": {{...}}}}')
        extra = sorted(set(function) - {"name", "description", "parameters"})
        name = function.get("name")
        description, parameters = function.get("description"), function.get("parameters")
        if extra:
            raise _bad(f"{where}.function has unknown key(s) {', '.join(extra)}")
        if not isinstance(name, str) or not FUNCTION_NAME_RE.match(name):
            raise _bad(f"{where}.function.name must be 1-64 characters of A-Za-z0-9_-")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.function.description must be a string")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"{where}.function.parameters must be a JSON schema (an object)")
        tools.append(Tool(FunctionSpec(name, description, parameters)))
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise _bad("`tools` names a function twice")
    return tuple(tools)


def _parse_tool_choice(raw: Any, tools: tuple[Tool, ...] | None) -> ToolChoice | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw in TOOL_CHOICE_MODES:
        if raw == "required" and not tools:
            raise _bad('`tool_choice` "required" needs `tools`')
        return raw  # type: ignore[return-value]
    if (
        isinstance(raw, dict)
        and set(raw) == {"type", "function"}
        and raw["type"] == "function"
        and isinstance(raw["function"], dict)
        and set(raw["function"]) == {"name"}
        and isinstance(raw["function"]["name"], str)
    ):
        name = raw["function"]["name"]
        if name not in {tool.function.name for tool in tools or ()}:
            raise _bad(f"`tool_choice` names the function {name[:64]!r}, which `tools` lacks")
        return NamedToolChoice(name)
    raise _bad(
        '`tool_choice` must be "auto", "none", "required" or '
        '{"type": "function", "function": {"name": "..."}}'
    )


# --- cancel -------------------------------------------------------------------------------------


def cancel_payload(job_id: str) -> dict[str, Any]:
    """`P/D/jobs/cancel`: `{"id": ...}`."""
    if not JOB_ID_RE.match(job_id):
        raise _bad("a job id is 1-128 characters of A-Za-z0-9._:-")
    return {"id": job_id}


def parse_cancel(payload: bytes) -> str:
    """A cancel request: `{"id": ...}`. Returns the job id. Raises ContractError."""
    check_size(payload, MAX_CANCEL_BYTES, "a cancel request")
    data = decode_json_object(payload)
    job_id = data.get("id")
    if set(data) != {"id"} or not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise _bad('a cancel request is exactly {"id": "<job id>"}')
    return job_id
