"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

Greedy (temperature 0) is a plain argmax with no softmax. Otherwise the distribution is narrowed by
top-k, then by top-p (nucleus) over the renormalised probabilities, then sampled with the job's own
random generator so a fixed seed reproduces the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SamplingParams:
    """How one job picks tokens. `temperature == 0` means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k limit
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Per-job token chooser; holds the job's random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def choose(self, logits: npt.NDArray[np.floating]) -> int:
        """Pick a token from one row of logits ([vocab])."""
        if self.params.greedy:
            return int(logits.argmax())
        scaled = logits.astype(np.float64) / self.params.temperature
        candidates = _top_k_indices(scaled, self.params.top_k)
        cand_logits = scaled[candidates]
        probs = np.exp(cand_logits - cand_logits.max())
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            candidates, probs = _top_p_filter(candidates, probs, self.params.top_p)
        return int(candidates[self._rng.choice(len(candidates), p=probs)])


def _top_k_indices(logits: npt.NDArray[np.float64], top_k: int) -> npt.NDArray[np.intp]:
    vocab = logits.shape[0]
    if top_k <= 0 or top_k >= vocab:
        return np.arange(vocab)
    # argpartition is O(vocab); only the k winners are sorted later (by top-p) if needed.
    return np.argpartition(logits, vocab - top_k)[vocab - top_k :]


def _top_p_filter(
    candidates: npt.NDArray[np.intp], probs: npt.NDArray[np.float64], top_p: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    cumulative = np.cumsum(sorted_probs)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    kept = order[:keep]
    kept_probs = probs[kept]
    return candidates[kept], kept_probs / kept_probs.sum()
