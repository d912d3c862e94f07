"""Tokenizer, chat template and the streaming detokenizer, on the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import JobError
from agent.text import TextCodec

TRICKY = [
    "Grüße aus Köln — 東京タワー 🗼🚀 and naïve café",
    "emoji family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, math ∑∫√",
    "  leading spaces, tabs\tand\nnewlines  ",
    "日本語のテキストと中文文本와 한국어",
]


@pytest.fixture(scope="module")
def codec(default_bundle: Path) -> TextCodec:
    return TextCodec(default_bundle)


@pytest.mark.parametrize("text", TRICKY)
def test_stream_never_splits_a_character_and_concatenates_exactly(
    codec: TextCodec, text: str
) -> None:
    ids = codec.tokenizer.encode(text, add_special_tokens=False).ids
    if not text.isascii():  # multi-byte characters really are split across tokens here
        assert any("\ufffd" in codec.decode([i]) for i in ids), "the test text is too easy"
    stream = codec.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == codec.decode(ids) == text


def test_chat_template_renders_like_transformers(codec: TextCodec) -> None:
    ids = codec.encode_messages([{"role": "user", "content": "Hi"}])
    text = codec.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_eos_ids_are_the_manifests_plus_the_tokenizers(default_bundle: Path) -> None:
    plain = TextCodec(default_bundle)
    assert [plain.tokenizer.id_to_token(i) for i in plain.eos_token_ids] == ["<|im_end|>"]
    assert TextCodec(default_bundle, eos_token_ids=[0]).eos_token_ids == {0, 2}


def test_messages_without_a_template_are_refused(tmp_path: Path, default_bundle: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((default_bundle / "tokenizer.json").read_bytes())
    codec = TextCodec(tmp_path)
    with pytest.raises(JobError) as info:
        codec.encode_messages([{"role": "user", "content": "x"}])
    assert info.value.job_code == "invalid_request" and "prompt" in info.value.message
    assert codec.encode_prompt("hello")  # a raw prompt still works
