"""Text samples for quantization calibration and for the accuracy gate's held-out evaluation.

Two plain-text sets ship with edge-build in `build_engine/data/`, both written for this project:

- `calibration.txt` (~11k SmolLM2 tokens): what activation-aware quantizers see. Used only to
  calibrate; a user replaces it with their own domain text via `--calibration FILE`.
- `heldout.txt` (~6k SmolLM2 tokens): what the accuracy gate measures on. It is never used for
  calibration, so the gate does not reward a quantizer for fitting its calibration text.

Format (the same for a user's `--calibration FILE`): UTF-8 text (a BOM is tolerated) made of
passages separated by one or more blank lines; a passage may span several lines, which keeps code
snippets, lists and chat-style dialogue intact. There is no header and no comment syntax: every
non-blank line is text. Both sets mix science, history, medicine, finance, industrial maintenance,
law, everyday conversation, instructions, Python and SQL snippets, lists, numbers, assistant-style
dialogue and a little non-English text, because a quantizer calibrated on one register (say, only
encyclopaedic prose) can clip the activation ranges that code or numbers produce.

Sequences: the passages are joined with a blank line between them, tokenized once without special
tokens, and cut into consecutive windows of exactly `seq_len` tokens (the trailing partial window
is dropped, so every sample has the same static shape). Passages therefore run across window
boundaries, as in the usual GPTQ/AWQ calibration recipes; what matters is that every window is
real, varied text. When there are more windows than `max_samples`, evenly spaced windows are taken
so the samples cover the whole file rather than its first topics only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from agent.text import TextCodec
from build_engine.errors import BuildError

CALIBRATION_FILE = "calibration.txt"
HELDOUT_FILE = "heldout.txt"
# Below this many windows a calibration set says more about its few passages than about the model's
# activation ranges; 8 x 128 tokens is still a short page of text, so any real domain file passes.
DEFAULT_MIN_SAMPLES = 8


def load_text_samples(
    path: Path | None,
    codec: TextCodec,
    *,
    seq_len: int = 128,
    max_samples: int = 64,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[list[int]]:
    """Calibration token windows from `path` (a user's `--calibration FILE`) or, when None, from
    the calibration text shipped with edge-build.

    Raises BuildError("bad_calibration") for a missing, unreadable, non-UTF-8 or empty file, or
    one too short to give `min_samples` windows of `seq_len` tokens.
    """
    if path is None:
        text, label = _shipped_text(CALIBRATION_FILE), f"the shipped {CALIBRATION_FILE}"
    else:
        text, label = _read_user_text(path), str(path)
    return _windows(text, label, codec, seq_len, max_samples, min_samples, "bad_calibration")


def heldout_samples(
    codec: TextCodec, *, seq_len: int = 256, max_samples: int = 16
) -> list[list[int]]:
    """The accuracy gate's evaluation windows: the shipped held-out text, never calibration data.

    A tokenizer more efficient than SmolLM2's may give fewer than `max_samples` windows; the gate
    then measures on fewer tokens rather than failing.
    """
    text = _shipped_text(HELDOUT_FILE)
    label = f"the shipped {HELDOUT_FILE}"
    return _windows(text, label, codec, seq_len, max_samples, 1, "bad_heldout")


def split_passages(text: str) -> list[str]:
    """Blank-line separated passages, each with its trailing whitespace removed."""
    passages: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            passages.append("\n".join(current))
            current = []
    if current:
        passages.append("\n".join(current))
    return passages


def _shipped_text(name: str) -> str:
    resource = resources.files("build_engine") / "data" / name
    try:
        return resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # a broken installation, not a user error
        raise BuildError(
            "missing_data", f"edge-build's {name} is missing or unreadable ({exc}): reinstall"
        ) from exc


def _read_user_text(path: Path) -> str:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise BuildError("bad_calibration", f"calibration file {path} {what}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BuildError("bad_calibration", f"cannot read calibration file {path}: {exc}") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BuildError(
            "bad_calibration",
            f"calibration file {path} is not UTF-8 text (invalid byte at offset {exc.start}); "
            "convert it, e.g. with `iconv -t UTF-8`",
        ) from exc


def _windows(
    text: str,
    label: str,
    codec: TextCodec,
    seq_len: int,
    max_samples: int,
    min_samples: int,
    code: str,
) -> list[list[int]]:
    if seq_len < 2 or max_samples < 1 or min_samples < 1:
        raise ValueError(f"seq_len={seq_len}, max_samples={max_samples}, min_samples={min_samples}")
    passages = split_passages(text)
    if not passages:
        raise BuildError(code, f"{label} is empty: give passages of plain text")
    ids = list(codec.tokenizer.encode("\n\n".join(passages), add_special_tokens=False).ids)
    count = len(ids) // seq_len
    if count < min_samples:
        needed = min_samples * seq_len
        raise BuildError(
            code,
            f"{label} is too short: {len(ids)} tokens in {len(passages)} passages give "
            f"{count} samples of {seq_len} tokens; at least {min_samples} are needed "
            f"(~{needed} tokens, about {needed * 3 // 4} words)",
        )
    chosen = _evenly_spaced(count, min(count, max_samples))
    return [ids[i * seq_len : (i + 1) * seq_len] for i in chosen]


def _evenly_spaced(total: int, wanted: int) -> list[int]:
    """`wanted` distinct indices in [0, total), spread over the whole range, in order."""
    if wanted >= total:
        return list(range(total))
    return [(i * total) // wanted for i in range(wanted)]
