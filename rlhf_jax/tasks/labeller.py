"""Simulated labeller: Bradley–Terry / Plackett–Luce sampling on a gold reward.

A human labeller is replaced by a noisy oracle that sees the gold reward ``g`` of each response
and prefers response ``a`` over ``b`` with the Bradley–Terry probability

    P(a > b) = σ((g_a − g_b) / τ),                                            (1)

``τ = noise`` ≥ 0 (a temperature on the gold scale [0, 1]). K-wise rankings use the
Plackett–Luce generalisation with utilities ``g_k / τ``: the labeller picks the best response
with probability ``softmax(g / τ)``, removes it, and repeats. Both are sampled exactly with the
Gumbel trick: ``order = argsort(−(g / τ + G))`` with ``G ~ Gumbel(0, 1)`` i.i.d.; for K = 2 the
probability that ``a`` ranks first is (1) because the difference of two Gumbels is logistic.

``τ = 0`` is the noiseless gold order (used to evaluate a learned reward model against the
truth); ties in gold are then broken by position, which is why the task generators avoid
sampling tied pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def plackett_luce_ranks(gold: Sequence[float], noise: float, rng: np.random.Generator) -> list[int]:
    """Ranks of K responses (0 = best) sampled by Plackett–Luce with utilities ``gold / noise``.

    Args:
      gold: the K gold rewards.
      noise: temperature τ ≥ 0; 0 gives the noiseless gold order (ties broken by index).
      rng: numpy generator; exactly K Gumbel draws are consumed when ``noise > 0``, none otherwise.
    Returns:
      ``ranks[k]`` = position of response k in the sampled order (a permutation of 0..K−1).
    """
    g = np.asarray(gold, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError(f"plackett_luce_ranks: expected ≥ 2 gold rewards, got shape {g.shape}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"plackett_luce_ranks: noise must be a finite number ≥ 0, got {noise!r}")
    if noise == 0:
        utility = g
    else:
        utility = g / noise + rng.gumbel(size=g.shape)
    # stable sort on −utility: equal utilities keep index order
    order = np.argsort(-utility, kind="stable")
    ranks = np.empty(g.size, dtype=np.int64)
    ranks[order] = np.arange(g.size)
    return [int(r) for r in ranks]


def bradley_terry_prefers_first(gold_a: float, gold_b: float, noise: float,
                                rng: np.random.Generator) -> bool:
    """True when the labeller prefers ``a``; ``P = σ((g_a − g_b)/noise)`` (eq. 1), exact at 0."""
    return plackett_luce_ranks([gold_a, gold_b], noise, rng)[0] == 0


def bradley_terry_probability(gold_a: float, gold_b: float, noise: float) -> float:
    """The probability in (1); 0/0.5/1 for ``noise = 0``."""
    if noise == 0:
        return float(gold_a > gold_b) + 0.5 * float(gold_a == gold_b)
    return float(1.0 / (1.0 + np.exp(-(gold_a - gold_b) / noise)))
