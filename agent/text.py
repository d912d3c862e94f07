"""Text in and out of the model: tokenization, chat templates and streaming detokenization.

Uses the Hugging Face `tokenizers` library and jinja2 only; chat templates are rendered the way
transformers renders them (sandboxed jinja2, `trim_blocks`, `lstrip_blocks`, `tojson`,
`raise_exception`) so a bundle answers exactly as it did at build time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from agent.errors import BundleError, JobError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # transformers' tojson keeps non-ASCII characters as they are.
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise BundleError(
                "bad_tokenizer", f"the chat template does not compile: {exc}"
            ) from exc
        self._special_tokens = special_tokens

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise JobError(
                "invalid_request", f"the model's chat template refused these messages: {exc}"
            ) from exc


def _load_chat_template(bundle_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = bundle_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class TextCodec:
    """Encodes prompts into token ids and decodes ids back to text for one bundle."""

    def __init__(self, bundle_dir: Path, eos_token_ids: Sequence[int] = ()) -> None:
        tokenizer_path = bundle_dir / TOKENIZER_FILE
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise BundleError("bad_tokenizer", f"cannot load {tokenizer_path}: {exc}") from exc
        config_path = bundle_dir / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise BundleError("bad_tokenizer", f"{config_path} is not JSON: {exc}") from exc
        special = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        source = _load_chat_template(bundle_dir, config)
        self.chat_template = ChatTemplate(source, special) if source is not None else None
        eos = set(eos_token_ids)
        eos_text = special.get("eos_token")
        if eos_text is not None and (eos_id := self.tokenizer.token_to_id(eos_text)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw completion prompt, with whatever special tokens the tokenizer adds itself."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Chat messages rendered with the bundle's template; the template already places the
        special tokens, so none are added again (as transformers' apply_chat_template does)."""
        if self.chat_template is None:
            raise JobError(
                "invalid_request",
                "this bundle has no chat template: send `prompt` instead of `messages`",
            )
        text = self.chat_template.render(messages)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text one at a time without ever emitting half a character.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; decoding it alone
    gives U+FFFD. Like vLLM and transformers' streamers, we decode a short window of recent tokens
    and emit only the text that the newest token completed, holding it back while it still ends in
    a replacement character. Concatenating every piece gives exactly `decode(all tokens)` whenever
    the final text is complete.
    """

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this were already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._codec.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._codec.decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._codec.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._codec.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
