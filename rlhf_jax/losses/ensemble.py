"""Reward-model ensemble aggregation (docs/MATH.md, "Reward-model ensembles"; Coste et al. 2023).

``member_scores [K, B]``: each member's (centred) reward of each sequence. ``mean``: the ensemble
mean; ``wco`` (worst-case optimisation): the minimum over members; ``uwo`` (uncertainty-weighted
optimisation): ``mean - λ·var`` with the variance across members (ddof 0). ``λ`` is traced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("mean", "wco", "uwo")


def aggregate_ensemble(member_scores: jax.Array, aggregation: str = "mean", uwo_lambda=0.0) -> jax.Array:
    """``[B]`` aggregated reward of ``member_scores [K, B]`` (``aggregation`` static, ``uwo_lambda`` traced)."""
    s = jnp.asarray(member_scores, jnp.float32)
    if s.ndim != 2:
        raise ValueError(f"aggregate_ensemble: member_scores must be [K, B], got shape {s.shape}")
    if aggregation == "mean":
        return jnp.mean(s, axis=0)
    if aggregation == "wco":
        return jnp.min(s, axis=0)
    if aggregation == "uwo":
        return jnp.mean(s, axis=0) - jnp.asarray(uwo_lambda, jnp.float32) * jnp.var(s, axis=0)
    raise ValueError(f"aggregate_ensemble: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
