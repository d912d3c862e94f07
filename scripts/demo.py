"""`make demo`: build the default bundle, start a broker and the agent, ask one question over MQTT,
show the streamed answer and its figures, shut everything down.

Everything runs on this machine: a private Mosquitto on a free port, the agent as its own process.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.config import MqttConfig
from agent.contract.bundle import MANIFEST_FILE
from agent.local_broker import start_local_broker
from fleet.prompt import PromptJob, print_event, send_prompt

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def say(text: str) -> None:
    if sys.stdout.isatty():
        text = f"\033[1m{text}\033[0m"
    print(f"==> {text}", flush=True)


def build_bundle(out: Path) -> None:
    if (out / MANIFEST_FILE).is_file():
        say(f"using the bundle already built at {out.relative_to(REPO)} (delete it to rebuild)")
        return
    say("building the default bundle: SmolLM2-135M-Instruct -> ONNX with KV cache")
    command = ["-m", "build_engine", "export", "--model", "smollm2-135m", "--out", str(out)]
    subprocess.run([sys.executable, *command], check=True)


def wait_for_line(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        if process.poll() is not None:
            raise SystemExit(f"the agent exited with status {process.returncode}:\n{text}")
        time.sleep(0.2)
    raise SystemExit(f"the agent did not get ready in {timeout:.0f} s; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2-135m")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    build_bundle(args.bundle)
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        workdir = Path(tmp)
        broker = start_local_broker(workdir)
        port = broker.port
        say(f"started Mosquitto on {broker.address}")
        agent_log = workdir / "agent.log"
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--bundle", str(args.bundle),
             "--broker", f"127.0.0.1:{port}", "--device-id", "demo-device",
             "--state-dir", str(workdir / "state")],
            stdout=agent_log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_line(agent_log, "connected to", agent, timeout=120)
            say("agent 'demo-device' is online (bundle verified and loaded)")
            say(f"asking over MQTT: {args.question!r}")
            print()
            final = send_prompt(
                MqttConfig(host="127.0.0.1", port=port, session_expiry_s=0),
                PromptJob(text=args.question, device="demo-device", max_tokens=64),
                timeout_s=120,
                on_event=print_event,
            )
            print()
            if final.get("event") != "done":
                say(f"the job failed: {json.dumps(final)}")
                return 1
            timing = final["timing"]
            say(
                f"TTFT {timing['ttft_ms']:.0f} ms, {timing['tokens_per_s']:.1f} tokens/s decode, "
                f"{final['usage']['completion_tokens']} tokens in {timing['total_ms']:.0f} ms"
            )
        finally:
            agent.send_signal(signal.SIGTERM)
            status = agent.wait(60)
            broker.stop()
            say(f"agent stopped (exit {status}), broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
