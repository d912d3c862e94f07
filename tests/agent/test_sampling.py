import numpy as np
import pytest

from agent.sampling import Sampler, SamplingParams


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def test_greedy_is_argmax() -> None:
    logits = np.array([0.1, 3.0, -2.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams()).choose(logits) == 1


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.normal(size=100).astype(np.float32)
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=1))
        assert sampler.choose(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_other_seed_differs() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    a = Sampler(SamplingParams(temperature=1.0, seed=42))
    b = Sampler(SamplingParams(temperature=1.0, seed=42))
    c = Sampler(SamplingParams(temperature=1.0, seed=43))
    seq_a = [a.choose(logits) for _ in range(20)]
    assert seq_a == [b.choose(logits) for _ in range(20)]
    assert seq_a != [c.choose(logits) for _ in range(20)]


def test_temperature_sampling_follows_the_distribution() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    logits = logits_of([0.25, 0.75])
    draws = [sampler.choose(logits) for _ in range(4000)]
    share = draws.count(1) / len(draws)
    assert share == pytest.approx(0.75, abs=0.03)


def test_low_temperature_sharpens() -> None:
    sampler = Sampler(SamplingParams(temperature=0.1, seed=7))
    logits = logits_of([0.4, 0.6])
    draws = [sampler.choose(logits) for _ in range(500)]
    assert draws.count(1) / len(draws) > 0.95


def test_top_k_never_picks_outside_the_k_best() -> None:
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=3))
    logits = np.arange(50, dtype=np.float32)  # best are 49, 48, 47
    assert {sampler.choose(logits) for _ in range(300)} == {47, 48, 49}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=5))
    logits = logits_of([0.5, 0.3, 0.15, 0.05])  # nucleus for 0.7: tokens 0 and 1
    assert {sampler.choose(logits) for _ in range(500)} == {0, 1}


def test_tiny_top_p_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1e-9, seed=5))
    logits = logits_of([0.2, 0.5, 0.3])
    assert {sampler.choose(logits) for _ in range(100)} == {1}
