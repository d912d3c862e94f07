"""The contract of DESIGN.md as types: what the agent, the fleet and the build exchange.

A leaf package: the standard library and the tools' stdlib-only error root (`agent.errors`) only
(tests/agent/test_contract.py checks it), so the fleet on a laptop and the build on a workstation
import it without the agent's runtime.

- `jobs`: the job request (`JobSpec`, both revisions) and the cancel request;
- `events`: job events (`Accepted`, `Delta`, `Done`, `JobFailed`) and the device status;
- `ota`: the update command and `ota/status`;
- `bundle`: the bundle's file names and `Manifest`, with its one writer and one reader;
- `payload`: strict JSON decoding and the id / sha256 formats;
- `errors`: the error codes and `ContractError`.
"""

from agent.contract.bundle import (
    ENGINE_FILE,
    GOLDEN_FILE,
    MANIFEST_FILE,
    ONNX_DATA_FILE,
    ONNX_MODEL_FILE,
    SIGNATURE_FILE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    Arch,
    Manifest,
    parse_manifest,
    write_manifest,
)
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
)
from agent.contract.jobs import MAX_PRIORITY, JobSpec, Message, parse_job_spec
from agent.contract.ota import OtaStatus, UpdateCommand, parse_ota_status
from agent.contract.payload import JOB_ID_RE, SHA256_RE

__all__ = [
    "ENGINE_FILE",
    "GOLDEN_FILE",
    "JOB_ID_RE",
    "MANIFEST_FILE",
    "MAX_PRIORITY",
    "ONNX_DATA_FILE",
    "ONNX_MODEL_FILE",
    "SHA256_RE",
    "SIGNATURE_FILE",
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "Accepted",
    "Arch",
    "ContractError",
    "Delta",
    "DeviceStatus",
    "Done",
    "EngineInfo",
    "JobFailed",
    "JobSpec",
    "Manifest",
    "Message",
    "OtaStatus",
    "Timing",
    "UpdateCommand",
    "Usage",
    "parse_event",
    "parse_job_spec",
    "parse_manifest",
    "parse_ota_status",
    "write_manifest",
]
