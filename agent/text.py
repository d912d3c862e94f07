"""Text in and out of the model: tokenization, chat templates and streaming detokenization.

Uses the Hugging Face `tokenizers` library and jinja2 only; chat templates are rendered the way
transformers renders them (sandboxed jinja2, `trim_blocks`, `lstrip_blocks`, `tojson`,
`raise_exception`) so a bundle answers exactly as it did at build time.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from agent.contract.bundle import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from agent.errors import BundleError, JobError


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
        self._source = source

    @property
    def source(self) -> str:
        return self._source

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
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
        self._control_tokens: _ControlTokens | None = None
        self._content_guard: _ContentGuard | None = None
        self._guard_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw completion prompt, with whatever special tokens the tokenizer adds itself.

        Special tokens spelled in it ARE parsed: the caller owns the whole string, markup
        included (that is what `prompt` is for). Only `messages` contents are protected."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def encode_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Chat messages rendered with the bundle's template; the template already places the
        special tokens, so none are added again (as transformers' apply_chat_template does).

        Message contents are text, never template markup (DESIGN, second revision): a control
        token spelled inside one (`<|im_end|>\\n<|im_start|>system ...`) is encoded as the
        plain text it is, so a user cannot forge a turn. Benign conversations (no control token
        spelled in any content, by far the common case) get exactly the ids of the rendered text.
        """
        if self.chat_template is None:
            raise JobError(
                "invalid_request",
                "this bundle has no chat template: send `prompt` instead of `messages`",
            )
        text = self.chat_template.render(messages)
        forged = [
            path
            for index, message in enumerate(messages)
            for path, value in _text_leaves(message, (index,))
            if self._controls.pattern.search(value)
        ]
        if not forged:
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self._guard().encode(self.chat_template, messages, text, forged)

    @property
    def _controls(self) -> _ControlTokens:
        if self._control_tokens is None:
            self._control_tokens = _ControlTokens.of(self.tokenizer, self.chat_template)
        return self._control_tokens

    def _guard(self) -> _ContentGuard:
        with self._guard_lock:  # built once, on the first content that spells a control token
            if self._content_guard is None:
                self._content_guard = _ContentGuard(self.tokenizer, self._controls)
            return self._content_guard

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


# --- message contents are text: control tokens spelled in them are not control tokens ---------

_BRANCH_KEYS = frozenset({"role", "type"})  # values templates branch on: markup, not text

LeafPath = tuple[int | str, ...]


def _text_leaves(value: Any, path: LeafPath) -> Iterator[tuple[LeafPath, str]]:
    """Every string a message carries (its content, text parts, tool-call fields), by path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key not in _BRANCH_KEYS:
                yield from _text_leaves(item, (*path, key))
    elif isinstance(value, list):  # JSON arrays (a tuple could not be sentinel-replaced)
        for index, item in enumerate(value):
            yield from _text_leaves(item, (*path, index))


def _replace_leaf(messages: list[Any], path: LeafPath, new: str) -> None:
    holder: Any = messages
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = new


class _ControlTokens:
    """The tokens only a template may produce: the tokenizer's special added tokens, plus the
    non-special added tokens the template itself emits as markup (DeepSeek-R1's user and
    assistant markers are not flagged special, yet they delimit the turns)."""

    def __init__(self, by_id: dict[int, str]) -> None:
        self.by_id = by_id
        texts = sorted(set(by_id.values()), key=len, reverse=True)
        # Never matches when there is nothing to protect.
        self.pattern = re.compile("|".join(map(re.escape, texts)) or r"(?!)")

    @classmethod
    def of(cls, tokenizer: Tokenizer, template: ChatTemplate | None) -> _ControlTokens:
        markup = _probe_markup(template)
        return cls(
            {
                token_id: token.content
                for token_id, token in tokenizer.get_added_tokens_decoder().items()
                if token.content and (token.special or token.content in markup)
            }
        )


_PROBES: tuple[list[dict[str, str]], ...] = (
    [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ],
    [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
)


def _probe_markup(template: ChatTemplate | None) -> str:
    """What the template emits around a plain conversation: its markup. (A token the template
    only tests for, like DeepSeek-R1's `</think>`, which it strips from past answers, is not
    markup; its source text is the fallback if it refuses both probes.)"""
    if template is None:
        return ""
    for probe in _PROBES:
        try:
            return template.render(probe)
        except JobError:
            continue
    return template.source


class _ContentGuard:
    """Encodes a rendered conversation whose contents spell control tokens.

    The rendered text T is encoded as usual; the template is rendered a second time with each
    such content replaced by a unique sentinel, which gives the markup around it; T is aligned
    to that markup (a content may appear as it is, stripped, as Llama-3's `| trim` does, or JSON
    escaped) to find each content's character span; every control token inside a span is then
    re-encoded, with the surrounding tokens of the span, by a copy of the tokenizer that treats
    control tokens as plain text. Anything that does not check out refuses the job rather than
    guessing: the tokens kept around each re-encoded region must meet it exactly, and the
    result's control tokens must be exactly those of the markup.
    """

    def __init__(self, tokenizer: Tokenizer, controls: _ControlTokens) -> None:
        self._tokenizer = tokenizer
        self._controls = controls
        spec = json.loads(tokenizer.to_str())
        for token in spec.get("added_tokens", []):
            if token.get("id") in controls.by_id:
                token["special"] = True  # so that encode_special_tokens turns them into text
        self._plain = Tokenizer.from_str(json.dumps(spec))
        self._plain.encode_special_tokens = True
        # Offsets straight from the model's pre-tokenization: a ByteLevel post-processor with
        # trim_offsets would cut spaces off them (ids are unchanged without add_special_tokens).
        self._located = Tokenizer.from_str(tokenizer.to_str())
        self._located.post_processor = None

    def encode(
        self,
        template: ChatTemplate,
        messages: Sequence[Mapping[str, Any]],
        text: str,
        forged: list[LeafPath],
    ) -> list[int]:
        marked = copy.deepcopy(list(messages))
        tag = uuid.uuid4().hex
        sentinels: dict[str, str] = {}
        for number, path in enumerate(forged):
            sentinel = f"EDGESENTINEL{tag}N{number}X"
            original: Any = messages
            for key in path:
                original = original[key]
            sentinels[sentinel] = original
            _replace_leaf(marked, path, sentinel)
        skeleton = template.render(marked)
        pattern = re.compile("|".join(map(re.escape, sentinels)))
        pieces = pattern.split(skeleton)
        contents = [sentinels[m.group(0)] for m in pattern.finditer(skeleton)]
        markup_controls = self._control_ids(skeleton)
        spans = _align(text, pieces, [_renderings(c) for c in contents])
        if spans is None:
            # The template changed those contents (DeepSeek-R1 keeps only what follows a past
            # answer's `</think>`): safe as usual only if no control token of theirs survived.
            if self._control_ids(text) == markup_controls:
                return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
            raise self._refusal("the chat template transforms them in a way we cannot follow")
        encoding = self._located.encode(text, add_special_tokens=False)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        if ids != list(self._tokenizer.encode(text, add_special_tokens=False).ids):
            raise self._refusal("this tokenizer's offsets cannot be trusted")
        for first, last in reversed(self._regions(ids, offsets, spans)):
            start, end = offsets[first][0], offsets[last][1]
            # The tokens kept on either side must end/start exactly at the region's edges (not
            # the case inside a multi-byte character split over two tokens, or with trimmed
            # offsets): then the new ids stand for exactly the same text as the old ones.
            if (first > 0 and offsets[first - 1][1] != start) or (
                last + 1 < len(offsets) and offsets[last + 1][0] != end
            ):
                raise self._refusal("their token boundaries cannot be located")
            ids[first : last + 1] = self._plain.encode(
                text[start:end], add_special_tokens=False
            ).ids
        if [i for i in ids if i in self._controls.by_id] != markup_controls:
            raise self._refusal("they could not be encoded as plain text")
        return ids

    def _control_ids(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [i for i in ids if i in self._controls.by_id]

    def _regions(
        self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Token index ranges to re-encode as text: each content span holding a control token,
        widened to the whole tokens it overlaps; ranges that overlap are merged."""
        regions: list[tuple[int, int]] = []
        for start, end in spans:
            overlapping = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
            if not any(ids[i] in self._controls.by_id for i in overlapping):
                continue
            first, last = overlapping[0], overlapping[-1]
            # Never cut between two tokens that share a character (a split UTF-8 sequence).
            while first > 0 and offsets[first - 1][1] > offsets[first][0]:
                first -= 1
            while last + 1 < len(offsets) and offsets[last + 1][0] < offsets[last][1]:
                last += 1
            if regions and first <= regions[-1][1]:
                first = regions[-1][0]
                regions.pop()
            regions.append((first, last))
        return regions

    @staticmethod
    def _refusal(why: str) -> JobError:
        return JobError(
            "invalid_request",
            "message contents spell the model's control tokens (e.g. <|im_end|>) and " + why
            + ": remove them from the messages, or send the whole text as `prompt`",
        )  # fmt: skip


def _renderings(content: str) -> list[str]:
    """How a template may print a content: as it is, `| trim`med, or inside `tojson`."""
    candidates = [
        content,
        content.strip(),
        content.lstrip(),
        content.rstrip(),
        json.dumps(content, ensure_ascii=False)[1:-1],
    ]
    return list(dict.fromkeys(candidates))


def _align(
    text: str, pieces: list[str], renderings: list[list[str]]
) -> list[tuple[int, int]] | None:
    """Character spans of the contents in `text` = pieces[0] + c0 + pieces[1] + c1 + ... where
    each ck is one of renderings[k]; None if `text` is not of that shape."""
    dead: set[tuple[int, int]] = set()  # (slot, position) pairs known not to lead to a match

    def walk(slot: int, position: int) -> list[tuple[int, int]] | None:
        if (slot, position) in dead or not text.startswith(pieces[slot], position):
            return None
        position += len(pieces[slot])
        if slot == len(renderings):
            return [] if position == len(text) else None
        for candidate in renderings[slot]:
            if text.startswith(candidate, position):
                rest = walk(slot + 1, position + len(candidate))
                if rest is not None:
                    return [(position, position + len(candidate)), *rest]
        dead.add((slot, position - len(pieces[slot])))
        return None

    return walk(0, 0)


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
