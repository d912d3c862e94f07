"""Nothing leaves the site: the agent answering a job, and a build, make no network traffic but to
the loopback broker, resolve no names, and create no file outside their own directories.

Seen before the fix, under strace: ONNX Runtime's telemetry looked up
`mobile.events.data.microsoft.com` (DNS to the resolver) and created
`~/.cache/Microsoft/DeveloperTools/.onnxruntime/` (a device id, an event database). The
assertions are on the processes' real system calls (strace -f), with HOME, TMPDIR and the working
directory pointed at empty directories that must stay empty.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Broker, MqttProbe, unique_device, wait_status

TRACED = "network,openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,link,symlink"
_SEND = re.compile(r"\b(connect|sendto|sendmsg|sendmmsg)\(")
_PORT = re.compile(r"htons\((\d+)\)")
_ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')
_CREATES = re.compile(
    r"\b(?:openat\((AT_FDCWD|\d+), \"([^\"]*)\", [^)]*O_CREAT"
    r"|open\(\"([^\"]*)\", [^)]*O_CREAT"
    r"|creat\(\"([^\"]*)\""
    r"|mkdir\(\"([^\"]*)\""
    r"|mkdirat\((AT_FDCWD|\d+), \"([^\"]*)\""
    r"|rename(?:at2?)?\((?:(?:AT_FDCWD|\d+), )?\"[^\"]*\", (?:(?:AT_FDCWD|\d+), )?\"([^\"]*)\")"
)
_FAILED = re.compile(r"= -1 E[A-Z]+")


def strace_or_skip() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    probe = subprocess.run([strace, "-f", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    return strace


def egress(trace: str) -> list[str]:
    """Every connect/send that names a non-loopback address, any port-53 (DNS) traffic, and any
    use of the name service cache daemon (a name lookup)."""
    bad = []
    for line in trace.splitlines():
        if not _SEND.search(line):
            continue
        if "nscd/socket" in line:
            bad.append(line)
            continue
        if "AF_INET" not in line:
            continue  # AF_UNIX (no nscd) / AF_NETLINK: local
        port = _PORT.search(line)
        if port is not None and int(port.group(1)) == 53:
            bad.append(line)
            continue
        for match in _ADDRESS.finditer(line):
            address = ipaddress.ip_address(match.group(1) or match.group(2))
            if not address.is_loopback:
                bad.append(line)
    return bad


def created_outside(trace: str, allowed: list[Path]) -> list[str]:
    """Paths the process created (O_CREAT, mkdir, rename targets) outside `allowed`; a path
    relative to a directory descriptor cannot be placed, so it counts as outside."""
    roots = [str(p.resolve()) for p in allowed]
    bad = []
    for line in trace.splitlines():
        match = _CREATES.search(line)
        if match is None or _FAILED.search(line):
            continue
        groups = match.groups()
        dirfd = groups[0] or groups[5]
        path = next(
            g
            for g in (groups[1], groups[2], groups[3], groups[4], groups[6], groups[7])
            if g is not None
        )
        if dirfd not in (None, "AT_FDCWD") and not path.startswith("/"):
            bad.append(line)
            continue
        if path.startswith("/dev/"):
            continue
        if not any(path == root or path.startswith(root + "/") for root in roots):
            bad.append(line)
    return bad


def empty_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def traced_env(dirs: dict[str, Path]) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "XDG_CACHE_HOME": str(dirs["home"] / ".cache"),
        "PYTHONDONTWRITEBYTECODE": "1",  # .pyc files in the source tree are not the agent's
        "PYTHONPATH": str(REPO),
    }


def assert_stayed_empty(dirs: dict[str, Path]) -> None:
    for name, d in dirs.items():
        left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        assert left == [], f"files created under {name} ({d}): {left}"


def traced_child(strace_pid: int) -> int:
    """The traced command's pid: the strace process's child running Python (strace also forks
    short-lived children of its own, running strace, to probe ptrace's features)."""
    python = os.path.realpath(sys.executable)
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children")
    for _ in range(600):
        for pid in children.read_text().split() if children.exists() else []:
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == python:
                    return int(pid)
            except OSError:
                continue  # already gone
        time.sleep(0.05)
    raise AssertionError("strace never started the agent")


def test_agent_answering_a_job_sends_nothing_off_site(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    strace = strace_or_skip()
    dirs = empty_dirs(tmp_path)
    state = tmp_path / "state"
    trace_file = tmp_path / "agent.strace"
    device = unique_device()
    process = subprocess.Popen(
        [strace, "-f", "-qq", "-e", f"trace={TRACED}", "-o", str(trace_file),
         sys.executable, "-m", "agent", "run", "--bundle", str(default_bundle),
         "--broker", broker.address, "--device-id", device, "--state-dir", str(state)],
        cwd=dirs["cwd"],
        env=traced_env(dirs),
        stdout=(tmp_path / "agent.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    agent: int | None = None
    try:
        agent = traced_child(process.pid)
        wait_status(probe, device, "online", timeout=120)
        topic = f"edgellm/{device}/results/egress-1"
        probe.subscribe(topic)
        job = {"id": "egress-1", "messages": [{"role": "user", "content": "Say hi."}]}
        probe.publish(f"edgellm/{device}/jobs", {**job, "max_tokens": 4})
        assert probe.events_until_final(topic)[-1]["event"] == "done"
        os.kill(agent, signal.SIGTERM)
        assert process.wait(60) == 0, (tmp_path / "agent.log").read_text()
    finally:
        # Killing strace alone would leave the agent running, detached.
        if agent is not None and process.poll() is None and Path(f"/proc/{agent}").exists():
            os.kill(agent, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        process.wait(30)
    trace = trace_file.read_text(errors="replace")
    assert f"htons({broker.port})" in trace  # the trace did see the agent's own connection
    assert egress(trace) == []
    assert created_outside(trace, [state, tmp_path / "agent.log"]) == []
    assert_stayed_empty(dirs)


@pytest.mark.slow
def test_build_export_sends_nothing_off_site(tmp_path: Path) -> None:
    """`edge-build export` of a tiny random Llama (SmolLM2's tokenizer), traced: ~1-2 min."""
    strace = strace_or_skip()
    from build_engine.model_source import load_tokenizer, resolve_model
    from tests.build_engine.conftest import _make_hf_model_dir

    tokenizer_dir = tmp_path / "tokenizer"
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(tokenizer_dir)
    model_dir = _make_hf_model_dir(tmp_path / "tiny", tokenizer_dir)
    dirs = empty_dirs(tmp_path)
    out = tmp_path / "out"
    trace_file = tmp_path / "build.strace"
    result = subprocess.run(
        [strace, "-f", "-qq", "-e", f"trace={TRACED}", "-o", str(trace_file),
         sys.executable, "-m", "build_engine", "export", "--model", str(model_dir),
         "--out", str(out / "bundle")],
        cwd=dirs["cwd"],
        env={**traced_env(dirs), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    trace = trace_file.read_text(errors="replace")
    assert "libonnxruntime" in trace  # the build did load ONNX Runtime
    assert egress(trace) == []
    # Its own temporary files go to TMPDIR (checked empty afterwards), the rest under --out.
    assert created_outside(trace, [out, dirs["tmp"]]) == []
    assert_stayed_empty(dirs)
