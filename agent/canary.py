"""Golden canaries: a handful of prompts whose greedy tokens a bundle must reproduce exactly.

`edge-build` records the tokens the bundle produced at build time in `golden.json`; the agent (and
later the OTA installer) replays them to prove the bundle it loaded answers as it was built to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends.base import Backend
from agent.contract.bundle import GOLDEN_FILE
from agent.errors import BundleError
from agent.generation import GenerationRequest, generate
from agent.text import TextCodec

GOLDEN_FORMAT = 1


@dataclass(frozen=True)
class Canary:
    name: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int = 24

    def encode(self, codec: TextCodec) -> list[int]:
        if self.messages is not None and codec.chat_template is not None:
            return codec.encode_messages([{"role": r, "content": c} for r, c in self.messages])
        if self.prompt is not None:
            return codec.encode_prompt(self.prompt)
        # A chat canary on a bundle without a chat template: fall back to the last message.
        return codec.encode_prompt(self.messages[-1][1] if self.messages else "")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "max_new_tokens": self.max_new_tokens}
        if self.prompt is not None:
            data["prompt"] = self.prompt
        if self.messages is not None:
            data["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        return data


DEFAULT_CANARIES: tuple[Canary, ...] = (
    Canary("capital", messages=(("user", "What is the capital of France?"),)),
    Canary("arithmetic", messages=(("user", "What is 12 plus 30? Answer with the number."),)),
    Canary("colors", messages=(("user", "Name three primary colors."),)),
    Canary("translate", messages=(("user", "Translate 'good morning' into Spanish."),)),
    Canary("completion", prompt="The three states of water are"),
)


@dataclass(frozen=True)
class CanaryResult:
    canary: Canary
    prompt_ids: list[int]
    token_ids: list[int]
    text: str


def run_canaries(
    backend: Backend[Any], codec: TextCodec, canaries: tuple[Canary, ...] = DEFAULT_CANARIES
) -> list[CanaryResult]:
    """Greedy-decode every canary on this backend."""
    results = []
    for canary in canaries:
        prompt_ids = canary.encode(codec)
        result = generate(
            backend, codec, GenerationRequest(prompt_ids, max_tokens=canary.max_new_tokens)
        )
        results.append(CanaryResult(canary, prompt_ids, result.token_ids, result.text))
    return results


def golden_document(results: list[CanaryResult], backend: str, precision: str) -> dict[str, Any]:
    return {
        "format": GOLDEN_FORMAT,
        "backend": backend,
        "precision": precision,
        "canaries": [
            {
                **r.canary.to_json(),
                "prompt_ids": r.prompt_ids,
                "token_ids": r.token_ids,
                "text": r.text,
            }
            for r in results
        ],
    }


def read_golden(bundle_dir: Path) -> list[tuple[Canary, list[int], list[int]]]:
    """(canary, prompt ids, expected token ids) for every canary in a bundle's golden.json."""
    path = bundle_dir / GOLDEN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = []
        for item in data["canaries"]:
            messages = item.get("messages")
            canary = Canary(
                name=str(item["name"]),
                prompt=item.get("prompt"),
                messages=tuple((m["role"], m["content"]) for m in messages) if messages else None,
                max_new_tokens=int(item["max_new_tokens"]),
            )
            entries.append((canary, list(item["prompt_ids"]), list(item["token_ids"])))
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError("bad_golden", f"{path} is missing or malformed: {exc}") from exc


def check_golden(bundle_dir: Path, backend: Backend[Any], codec: TextCodec) -> list[str]:
    """Replay the bundle's canaries; return one line per mismatch (empty = all match)."""
    problems = []
    for canary, prompt_ids, expected in read_golden(bundle_dir):
        got_prompt = canary.encode(codec)
        if got_prompt != prompt_ids:
            problems.append(f"{canary.name}: the prompt tokenizes differently than at build time")
            continue
        result = generate(backend, codec, GenerationRequest(got_prompt, canary.max_new_tokens))
        if result.token_ids != expected:
            diverge = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(result.token_ids, expected, strict=False))
                    if a != b
                ),
                min(len(result.token_ids), len(expected)),
            )
            problems.append(
                f"{canary.name}: greedy tokens differ from golden at position {diverge}"
            )
    return problems
