"""Build a serialized engine from a parsed network: builder config, profiles, timing cache.

- The workspace memory pool is capped (`set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`)
  so tactic selection cannot take the whole unified memory of the Jetson from the agent.
- `builder_optimization_level` (0-5, TensorRT's default 3) trades build time for engine speed.
- One optimization profile per phase (`agent.backends.tensorrt.profiles`): prefill and decode.
- A persistent timing cache: kernel timings measured by one build are reused by the next (the
  same layers in another precision, a rebuild with other limits), which cuts build time a lot.
  TensorRT refuses a cache from another device or TensorRT version; then a fresh one is started.
  ("Optimizing Builder Performance", Timing Cache:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/builder-performance.html)

Python API: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.backends.tensorrt.seam import ProfileShape
from build_engine.errors import BuildError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildSettings:
    workspace_bytes: int
    optimization_level: int  # 0..5


def build_serialized_engine(
    trt: ModuleType,
    builder: Any,
    network: Any,
    logger: Any,
    profiles: Sequence[dict[str, ProfileShape]],
    settings: BuildSettings,
    timing_cache: Path,
    progress: Progress,
) -> bytes:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    for index, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) != index:
            raise BuildError(
                "bad_profile",
                f"TensorRT rejected optimization profile {index}: {'; '.join(logger.errors)}",
            )
    _attach_timing_cache(config, timing_cache, progress)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            "engine_build_failed",
            "TensorRT could not build the engine: "
            + ("; ".join(logger.errors[-10:]) or "see its log above")
            + ". Out of memory? Lower --max-context, --max-batch or --workspace-gb",
        )
    _save_timing_cache(config, timing_cache)
    return bytes(serialized)


def _attach_timing_cache(config: Any, path: Path, progress: Progress) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(blob), False):  # False: no mismatch
        if blob:
            progress(f"reusing the timing cache {path} ({len(blob) / 1e6:.1f} MB)")
        return
    progress(f"timing cache {path} is from another GPU or TensorRT version: starting anew")
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Written beside the engines, atomically: builds can run one after another or at once."""
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)
