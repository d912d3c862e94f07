"""Check that the exported ONNX graph computes what the PyTorch model computes.

Each prompt runs through both, the way the agent will run it: a prefill with an empty KV cache
(past tensors of sequence length 0), then greedy decode steps that feed one token and the cache
back. Both sides are fed the same tokens (PyTorch's greedy choices), so the logits stay comparable
at every step even where a near-tie would otherwise send the two down different paths.

Tolerance, per step: max |logits_onnx - logits_torch| <= atol + rtol * max |logits_torch|.
The relative term scales with the model's logit range (tiny random models produce logits ~0.4,
real ones ~20-40). Measured (ORT CPU, default graph optimizations, fp32 export): tiny random
Llama 3e-7 against a tolerance of ~1.4e-4; SmolLM2-135M 6.4e-5 against ~2.2e-3 to 3.7e-3, a
margin of ~35x. A damaged graph is orders of magnitude out (scaling one weight table by 1.5 gives
diffs > 100x the tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from build_engine.errors import BuildError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
DEFAULT_NEW_TOKENS = 8


@dataclass(frozen=True)
class StepParity:
    """One forward pass: step 0 is the prefill, step k>0 the k-th single-token decode."""

    step: int
    max_abs_diff: float
    tolerance: float
    torch_token: int
    onnx_token: int
    # An argmax disagreement inside the tolerance is a tie at fp32 precision, not a bug.
    tokens_agree: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.tokens_agree


@dataclass(frozen=True)
class PromptParity:
    """All steps of one prompt."""

    prompt: str
    prompt_tokens: int
    steps: tuple[StepParity, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def max_abs_diff(self) -> float:
        return max(s.max_abs_diff for s in self.steps)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The greedy continuation PyTorch produced."""
        return tuple(s.torch_token for s in self.steps)


@dataclass(frozen=True)
class ParityReport:
    """Per-prompt results; `ok` only if every step of every prompt passed."""

    prompts: tuple[PromptParity, ...]
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.prompts)

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.prompts), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (e.g. for the manifest's `quality`)."""
        return {
            "ok": self.ok,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_logit_diff": self.max_abs_diff,
            "prompts": [
                {
                    "prompt": p.prompt,
                    "prompt_tokens": p.prompt_tokens,
                    "max_abs_logit_diff": p.max_abs_diff,
                    "tokens_match": all(s.torch_token == s.onnx_token for s in p.steps),
                    "ok": p.ok,
                }
                for p in self.prompts
            ],
        }

    def raise_if_failed(self) -> None:
        """Raise `BuildError("parity_failed")` naming the first failing prompt and step."""
        for p in self.prompts:
            for s in p.steps:
                if s.ok:
                    continue
                where = "prefill" if s.step == 0 else f"decode step {s.step}"
                if s.max_abs_diff > s.tolerance:
                    what = (
                        f"max |logit diff| {s.max_abs_diff:.3g} exceeds the tolerance "
                        f"{s.tolerance:.3g} (atol {self.atol:g} + rtol {self.rtol:g} x logit range)"
                    )
                else:
                    what = (
                        f"greedy token differs (PyTorch {s.torch_token}, ONNX {s.onnx_token}) "
                        "by more than the tolerance"
                    )
                raise BuildError(
                    "parity_failed",
                    f"ONNX graph does not match the PyTorch model for prompt {p.prompt!r} at "
                    f"{where}: {what}; the export is broken, do not ship it",
                )


def check_parity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    onnx_path: Path,
    prompts: list[str],
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ParityReport:
    """Compare PyTorch and ONNX Runtime (CPU) logits and greedy tokens on each prompt."""
    import onnxruntime as ort

    if not prompts:
        raise ValueError("check_parity needs at least one prompt")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise BuildError("parity_failed", f"ONNX Runtime cannot load {onnx_path}: {e}") from e
    results = tuple(
        _one_prompt(model, tokenizer, session, prompt, new_tokens, atol, rtol) for prompt in prompts
    )
    return ParityReport(prompts=results, atol=atol, rtol=rtol)


def _one_prompt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    session: Any,
    prompt: str,
    new_tokens: int,
    atol: float,
    rtol: float,
) -> PromptParity:
    import numpy as np
    import torch

    ids: list[int] = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise BuildError("parity_failed", f"parity prompt {prompt!r} encodes to no tokens")
    feeds = _empty_past(session)
    torch_cache: Any = None
    steps: list[StepParity] = []
    step_ids = ids
    past_len = 0
    for step in range(new_tokens):
        n = len(step_ids)
        input_ids = np.asarray([step_ids], dtype=np.int64)
        mask = np.ones((1, past_len + n), dtype=np.int64)
        positions = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]

        with torch.inference_mode():
            out = model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
                past_key_values=torch_cache,
                use_cache=True,
            )
        torch_cache = out.past_key_values
        ref = out.logits[0].float().numpy()

        names = [o.name for o in session.get_outputs()]
        onnx_out = dict(
            zip(
                names,
                session.run(
                    None,
                    {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
                    | feeds,
                ),
                strict=True,
            )
        )
        got = onnx_out["logits"][0]
        feeds = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in onnx_out.items()
            if name.startswith("present.")
        }

        steps.append(_compare(step, ref, got, atol, rtol))
        step_ids = [steps[-1].torch_token]
        past_len += n
    return PromptParity(prompt=prompt, prompt_tokens=len(ids), steps=tuple(steps))


def _compare(
    step: int, ref: np.ndarray[Any, Any], got: np.ndarray[Any, Any], atol: float, rtol: float
) -> StepParity:
    import numpy as np

    if ref.shape != got.shape:
        raise BuildError(
            "parity_failed", f"ONNX logits have shape {got.shape}, PyTorch {ref.shape}"
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    if not np.isfinite(diff):
        diff = float("inf")
    tolerance = atol + rtol * float(np.max(np.abs(ref)))
    last_ref, last_got = ref[-1], got[-1]
    torch_token, onnx_token = int(np.argmax(last_ref)), int(np.argmax(last_got))
    agree = torch_token == onnx_token or bool(
        last_ref[torch_token] - last_ref[onnx_token] <= tolerance
    )
    return StepParity(
        step=step,
        max_abs_diff=diff,
        tolerance=tolerance,
        torch_token=torch_token,
        onnx_token=onnx_token,
        tokens_agree=agree,
    )


def _empty_past(session: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Zero-length past tensors, shaped [1, kv_heads, 0, head_dim] from the graph's own inputs."""
    import numpy as np

    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for inp in session.get_inputs():
        if not inp.name.startswith("past_key_values."):
            continue
        _, kv_heads, _, head_dim = inp.shape
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            raise BuildError("parity_failed", f"{inp.name} has no static kv_heads/head_dim")
        dtype = dtypes.get(inp.type)
        if dtype is None:
            raise BuildError("parity_failed", f"{inp.name} has unsupported type {inp.type}")
        feeds[inp.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
    if not feeds:
        raise BuildError("parity_failed", "the graph has no past_key_values inputs")
    return feeds
